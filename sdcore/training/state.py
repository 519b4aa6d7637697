"""Everything a run needs to continue exactly where it stopped: weights, optimiser, scaler, LR
schedule, step, the RNG states of every rank, the MLPerf log's length, and the loss history.

The state is two files in the run's ``train/`` folder: ``state.pt`` (everything but the weights,
``torch.load(weights_only=True)``-loadable) and the UNet weights it names, a safetensors file:
the checkpoint of that step when there is one, else ``unet_step_N.safetensors`` beside it. The
weights are written first and ``state.pt`` last, both atomically, and older weight files are
removed only after, so a kill at any moment leaves the previous state loadable.
"""

from __future__ import annotations

import logging
import random
import signal
from pathlib import Path

import numpy as np
import torch

from sdcore.checkpoint import load_unet, save_unet
from sdcore.files import is_temporary, save_torch

log = logging.getLogger(__name__)

STATE_FILE = "state.pt"
RESUME_WEIGHTS = "unet_step_{step:08d}.safetensors"


def rng_states() -> dict:
    """Global RNG states of this process, in a form ``torch.load(weights_only=True)`` accepts."""
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": np_pos,
                  "has_gauss": np_has_gauss, "gauss": np_gauss},
        "python": random.getstate(),
    }


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


def save_state(run_dir: Path, state: dict, unet_state: dict, checkpoint: Path | None = None) -> None:
    """Write the resume state of ``state["step"]``; ``checkpoint``: that step's saved UNet weights."""
    train_dir = run_dir / "train"
    if checkpoint is None:
        checkpoint = train_dir / RESUME_WEIGHTS.format(step=state["step"])
        save_unet(checkpoint, unet_state, {"step": state["step"]})
    save_torch({**state, "unet_file": str(checkpoint.relative_to(run_dir))}, train_dir / STATE_FILE)
    for old in train_dir.glob("unet_step_*.safetensors"):
        if old != checkpoint and not is_temporary(old.name):
            old.unlink()


def load_state(run_dir: Path) -> tuple[dict, dict] | None:
    """(state, unet_state) of the last resume point, or None for a run that has not started."""
    path = run_dir / "train" / STATE_FILE
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    unet_state, metadata = load_unet(run_dir / state["unet_file"])
    if metadata.get("step") != state["step"]:
        raise RuntimeError(f"{path} is at step {state['step']} but {state['unet_file']} at {metadata.get('step')}")
    return state, unet_state


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1; the loop polls it at step boundaries. Restores the old handlers on close."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        log.warning("received %s: saving the state at the next step boundary", signal.Signals(signum).name)
        self.requested = True

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
