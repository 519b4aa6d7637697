"""Logging of the project's command-line tools: one format, ranks labelled, third-party chatter
(open_clip, timm, urllib3, fsspec, matplotlib ...) kept to warnings so job logs show our lines."""

import logging
import os
import sys
import time

QUIET_LIBRARIES = ("open_clip", "timm", "urllib3", "fsspec", "s3fs", "botocore", "matplotlib", "PIL", "h5py",
                   "torch.distributed", "img2dataset", "wandb", "httpx", "huggingface_hub")


def setup_logging(level: int = logging.INFO) -> None:
    """Our lines at ``level``, each labelled with its rank (torchrun or srun); libraries at WARNING."""
    rank = os.environ.get("RANK") or os.environ.get("SLURM_PROCID") or "0"
    logging.basicConfig(level=level, stream=sys.stderr,
                        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)  # also when a handler was there before (basicConfig then adds none)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


class ProgressLog:
    """Progress of a long job as log lines (job logs are files, not terminals): done/total, rate and
    ETA, at most one line every ``every_seconds`` and one at the end."""

    def __init__(self, what: str, total: int | None, unit: str = "items", every_seconds: float = 10.0,
                 logger: logging.Logger | None = None):
        self.what, self.total, self.unit, self.every = what, total, unit, every_seconds
        self.done = 0
        self.log = logger or logging.getLogger("sdcore.progress")
        self.started = self.last = time.monotonic()

    def update(self, count: int = 1) -> None:
        self.done += count
        now = time.monotonic()
        if now - self.last >= self.every or self.done == self.total:
            self.last = now
            rate = self.done / max(now - self.started, 1e-9)
            if self.total:
                eta = (self.total - self.done) / rate if rate else float("inf")
                self.log.info("%s: %d/%d %s (%.0f%%), %.1f %s/s, ETA %s", self.what, self.done, self.total, self.unit,
                              100 * self.done / self.total, rate, self.unit, format_duration(eta))
            else:
                self.log.info("%s: %d %s, %.1f %s/s", self.what, self.done, self.unit, rate, self.unit)


def format_duration(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``?`` for an unknown duration."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
