"""Data preparation: LAION metadata to latent shards, COCO prompts and FID statistics.

Every writer here produces its output under a temporary name in the destination directory and
renames it into place, so an interrupted job never leaves a file that looks complete.
"""

import contextlib
import json
import os
from pathlib import Path


class PrepError(RuntimeError):
    """Bad input or a failed preparation step; the message names the offending file."""


@contextlib.contextmanager
def atomic_output(path):
    """Yield a temporary path beside `path`; rename it onto `path` only if the block succeeds.

    The temporary file lives in the same directory so that the final os.replace is atomic; it is
    not pre-created, so the output gets the usual umask permissions.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path, obj):
    """Write `obj` as indented JSON, atomically."""
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path):
    """Read a JSON file, raising PrepError naming the file when it is missing or malformed."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise PrepError(f"{path}: cannot read JSON: {err}") from err


def resolve_device(device):
    """'auto' means the first CUDA device when there is one, else the CPU."""
    import torch  # kept local: the metadata steps do not need torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
