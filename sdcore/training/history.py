"""The loss history of a run: ``loss.csv`` (rank 0 appends a row per step), the loss curve PNG
redrawn as training goes, and TensorBoard scalars.

On resume the CSV is cut back to the resumed step (rewritten atomically: a kill during the rewrite
leaves the old file) and TensorBoard purges the events after it, so a resumed run's history reads
like that of a run that never stopped. A history that does not hold every step up to the resumed
one (a row lost or torn) is an error naming the file, not a gap.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

from sdcore.files import atomic_path

FIELDS = ("step", "samples", "loss", "lr")


class LossHistory:
    """``loss.csv`` (step, samples, loss, lr), on rank 0 only (``enabled``)."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path = Path(path)
        self.enabled = enabled
        if not enabled:
            return
        rows = kept_rows(self.path, resume_step) if resume_step else []
        with atomic_path(self.path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def append(self, step: int, samples: int, loss: float, lr: float) -> None:
        if self.enabled:
            try:
                with open(self.path, "a", newline="") as f:
                    csv.writer(f).writerow([step, samples, f"{loss:.8g}", f"{lr:.8g}"])
            except OSError as error:  # a full disk: name the file (the resume drops a torn last row)
                raise OSError(error.errno, f"cannot write {self.path}: {error.strerror or error}") from error

    def last_loss(self) -> float | None:
        rows = read_losses(self.path)
        return float(rows[-1]["loss"]) if rows else None


def read_losses(path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


def kept_rows(path, resume_step: int) -> list[dict]:
    """The rows of steps 1..resume_step, which must all be there, complete and in order; the rows
    after (of an attempt that went on before it was killed, a torn last one included) are dropped."""
    rows = []
    for row in read_losses(path):
        if len(rows) == resume_step:
            break
        try:
            step = int(row["step"])
        except (TypeError, ValueError):
            step = None
        if step != len(rows) + 1 or any(row.get(name) in (None, "") for name in FIELDS):
            raise ValueError(f"{path}: the loss history is damaged at row {len(rows) + 2} ({row}): it must hold "
                             f"every step up to {resume_step}, where the run resumes")
        rows.append(row)
    if len(rows) != resume_step:
        raise ValueError(f"{path}: the loss history ends at step {len(rows)}, but the run resumes at step "
                         f"{resume_step}: rows are missing")
    return rows


def plot_loss(csv_path, png_path, title: str = "training loss") -> None:
    """Loss per step and a running mean against training samples, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_losses(csv_path)
    samples = np.array([int(r["samples"]) for r in rows])
    losses = np.array([float(r["loss"]) for r in rows])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(samples, losses, lw=0.6, alpha=0.5, label="loss per step")
    if len(losses) >= 20:
        window = max(10, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(samples[window - 1:], smooth, lw=1.5, label=f"mean of {window} steps")
    ax.set_xlabel("training samples")
    ax.set_ylabel("v-prediction MSE")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


class Scalars:
    """TensorBoard scalars under ``logdir`` (rank 0 only; a no-op when disabled).

    Each attempt writes its own event file, opening with a purge of the events after the step it
    resumes at: those of an attempt that ran further before it was killed. A fresh start
    (``resume_step`` None) purges from step 1, i.e. the events of an attempt that died before its
    first saved state, as ``LossHistory`` drops its rows.
    """

    def __init__(self, logdir: Path | None, resume_step: int | None):
        self.writer = None
        if logdir is not None:
            from torch.utils.tensorboard import SummaryWriter

            os.makedirs(logdir, exist_ok=True)
            self.writer = SummaryWriter(str(logdir), purge_step=1 if resume_step is None else resume_step + 1)

    def add(self, step: int, **values: float) -> None:
        if self.writer is not None:
            for name, value in values.items():
                if value is not None:
                    self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
