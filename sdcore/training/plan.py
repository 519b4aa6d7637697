"""What a run will do, from the config and the world size: batch sizes, learning rate and its
warm-up, the checkpoint steps and the step budget.

The learning-rate schedule lives here and nowhere else: the reference's LambdaLinearScheduler
with f_start = ``warmup_start_factor``, f_max = f_min = 1 and ``warmup_steps`` warm-up steps,
multiplying base rate x global batch.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: the workflow reads checkpoint_steps at parse time
    import torch


@dataclass(frozen=True)
class TrainPlan:
    seed: int
    world_size: int
    batch_size: int                # per rank and micro-batch
    accumulation: int
    global_batch: int
    learning_rate: float           # base rate x global batch
    warmup_steps: int
    warmup_start_factor: float
    checkpoint_every_steps: int
    max_steps: int
    precision: str
    num_workers: int               # the data stream depends on it (one stream role per worker)

    @classmethod
    def from_config(cls, config: dict, world_size: int, seed: int) -> "TrainPlan":
        train = config["train"]
        global_batch = world_size * train["batch_size"] * train["gradient_accumulation_steps"]
        return cls(
            seed=seed,
            world_size=world_size,
            batch_size=train["batch_size"],
            accumulation=train["gradient_accumulation_steps"],
            global_batch=global_batch,
            learning_rate=config["model"]["base_learning_rate"] * global_batch,
            warmup_steps=train["warmup_steps"],
            warmup_start_factor=train["warmup_start_factor"],
            checkpoint_every_steps=math.ceil(train["checkpoint_every_samples"] / global_batch),
            max_steps=math.ceil(sample_budget(train["max_samples"], global_batch) / global_batch),
            precision=train["precision"],
            num_workers=train["num_workers"],
        )

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def is_checkpoint(self, step: int) -> bool:
        """A checkpoint every ``checkpoint_every_steps`` steps, and one at the end of the budget."""
        return step % self.checkpoint_every_steps == 0 or step == self.max_steps

    @property
    def checkpoint_steps(self) -> list[int]:
        return [step for step in range(1, self.max_steps + 1) if self.is_checkpoint(step)]


RCP_FILE = ("rcp_checker", "training_5.0.0", "rcps_stable_diffusion.json")
RCP_MARGIN_STD = 4  # the budget: the reference convergence's mean plus this many standard deviations


def rcp_budget(global_batch: int) -> int:
    """Samples that a run at this global batch size may need: mean + 4 std of the MLPerf reference
    convergence points (mlperf_logging's RCP table, ruleset 5.0.0) of the largest reference batch
    size not above it (the smallest one for smaller batches), rounded up to whole checkpoints."""
    import json
    import os
    import statistics

    import mlperf_logging

    with open(os.path.join(os.path.dirname(mlperf_logging.__file__), *RCP_FILE)) as f:
        table = {rcp["BS"]: rcp["Epochs to converge"] for rcp in json.load(f).values()}
    batch = max([bs for bs in table if bs <= global_batch] or [min(table)])
    points = table[batch]
    budget = statistics.mean(points) + RCP_MARGIN_STD * statistics.stdev(points)
    return math.ceil(budget / CHECKPOINT_SAMPLES) * CHECKPOINT_SAMPLES


CHECKPOINT_SAMPLES = 512_000  # the rules' checkpoint interval, the budget's rounding unit


def sample_budget(max_samples: int | str, global_batch: int) -> int:
    """``train.max_samples``: a number of samples, or "auto" for ``rcp_budget``."""
    return rcp_budget(global_batch) if max_samples == "auto" else int(max_samples)


def checkpoint_steps(config: dict) -> list[int]:
    """The checkpoint steps of a run of this config (the world size from ``launch``), for the workflow."""
    launch = config["launch"]
    return TrainPlan.from_config(config, launch["nodes"] * launch["nproc_per_node"], seed=0).checkpoint_steps


def warmup_factor(step: int, warmup_steps: int, start_factor: float) -> float:
    """LR factor of optimizer step ``step`` (0-based): ``(1 - f_start) / W * n + f_start`` while n < W, then 1."""
    if step < warmup_steps:
        return (1.0 - start_factor) / warmup_steps * step + start_factor
    return 1.0


def lr_schedule(optimizer: "torch.optim.Optimizer", plan: TrainPlan) -> "torch.optim.lr_scheduler.LambdaLR":
    """Stepped once per optimizer call, also when the fp16 scaler skips the update (inf/NaN
    gradients), as Lightning does in the reference (Lightning issues #5558, #18828)."""
    import torch

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda n: warmup_factor(n, plan.warmup_steps, plan.warmup_start_factor))
