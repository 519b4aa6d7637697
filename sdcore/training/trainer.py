"""The training loop of the MLPerf text-to-image benchmark (SPEC sections 3-5), read top to bottom
in ``Trainer.run``.

AdamW on the UNet only; learning rate = base rate x global batch with the reference's linear
warm-up (``plan.lr_schedule``); fp16 autocast with a GradScaler (or fp32 / bf16); DDP across
ranks; gradient accumulation; v-objective loss; a checkpoint every
``ceil(checkpoint_every_samples / global_batch)`` steps up to the sample budget.

Evaluation (``eval.mode``). *offline* (the MLPerf rules' way): the timed training only saves
checkpoints; the workflow evaluates each one in its own job, and the log-merge step writes the
final MLPerf log. With ``eval.stop_on_target`` the trainer polls those results and stops once a
checkpoint meets the target. *inline*: the trainer evaluates each checkpoint itself and logs the
scores, stopping at the first passing checkpoint with ``stop_on_target``.

Exact resumption. Nothing random in a step comes from a global RNG: the data stream of a rank is
a function of the step (``sdcore.data``), and the latent, timestep and noise of every sample come
from a generator seeded by (seed, step, micro-batch, global sample index). A run restored from its
state (``training.state``) therefore continues bit for bit like one that never stopped. The
sample index is global, so the trajectory depends on the global batch, not on its split.

Seeds. ``train.seed`` null draws one from the system's entropy at the run's first start
(``random.SystemRandom``, as the reference); it is logged, saved in the state and in every
checkpoint, and every stream (data order, noise, evaluation latents) derives from it.

Run directory (``run_dir``): ``train/`` holds what only training writes (``state.pt``, the MLPerf
training log, ``loss.csv``, ``loss.png``, ``summary.json``, written last); ``checkpoints/`` the UNet
weights of every checkpoint (safetensors); ``eval/`` the evaluation results; ``tb/`` TensorBoard.

Preemption: SIGTERM or SIGUSR1 sets a flag; at the next step boundary the ranks agree on it, save
the state and exit with ``PREEMPTED_EXIT_CODE`` so a retry resumes.

Faults (benchmarks/faults.py kills, corrupts and fills the disk under a demo run). One trainer per
run directory: rank 0 holds ``<run_dir>/.train.lock`` (flock) for the whole attempt, so a second
trainer there (a retry started beside a killed attempt's ranks, a second workflow) stops before it
writes anything; the hidden temporaries that a killed attempt's atomic writes left are removed. A
run whose finished state was written but whose summary (the job's declared output, which the
workflow deletes when a job fails) is missing writes the summary again instead of refusing. Bad
training samples (``sdcore.data``: wrong shape, caption not UTF-8, truncated shard) are left out of
the stream and counted: a step's micro-batches are fetched before the previous step ends, and the
ranks agree on their new bad samples in that step's collective, so a step with a skip is never
trained once more than ``train.max_bad_samples`` (default 0) distinct samples were bad: the state
is saved and every rank stops with ``BadDataError`` naming the shards. The set is kept in the state.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import random
import socket
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from sdcore.autoencoder import sample_from_moments
from sdcore.checkpoint import StableDiffusionCheckpoint, save_unet
from sdcore.data import Conditioner, FrozenTextConditioner, LatentShardSource, MicroBatchSource, read_latent_index, \
    stream_seed
from sdcore.diffusion import LinearSchedule, v_loss
from sdcore.distributed import DistEnv, barrier, broadcast_object, init_distributed, shutdown
from sdcore.evaluate import EvalInputs, Evaluator, read_eval_results, targets_met, write_eval_result
from sdcore.files import is_temporary, read_json, write_json
from sdcore.logs import format_duration
from sdcore.mlperf_log import MlperfLogger
from sdcore.precision import FastPaths, warn_if_slow_precision
from sdcore.training.history import LossHistory, Scalars, plot_loss
from sdcore.training.plan import TrainPlan, lr_schedule
from sdcore.training.state import PreemptionFlag, load_state, rng_states, save_state, set_rng_states
from sdcore.unet import UNetModel

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; a retry resumes from the saved state
NOISE_SEED_DOMAIN = 2     # keeps the per-sample noise seeds apart from the data-stream seeds
PROGRESS_EVERY_SECONDS = 10.0
TARGET_POLL_SECONDS = 10.0


LOCK_FILE = ".train.lock"
# Config keys that may change between the attempts of a run: they do not change what is trained, only
# when the run stops (which bad samples are skipped is the data's doing, whatever the limit).
RESUMABLE_CHANGES = ("train.max_bad_samples",)
MAX_LISTED_BAD_SAMPLES = 5


class RunError(RuntimeError):
    """A run directory that this launch must not continue (finished, or started with other settings)."""


class BadDataError(RuntimeError):
    """More bad training samples than ``train.max_bad_samples``; the message names them and their shards."""


@dataclass(frozen=True)
class TrainInputs:
    """The files a run reads, as the workflow's rule names them."""

    latents: Path | None = None        # latent index (sdcore.data.read_latent_index)
    sd_checkpoint: Path | None = None  # frozen text encoder
    eval: EvalInputs | None = None     # inline evaluation only
    text_embeddings: Path | None = None  # precomputed contexts (sdcore.embeddings index), instead of the encoder


def latent_source(config: dict, env: DistEnv, plan: TrainPlan, inputs: TrainInputs) -> MicroBatchSource:
    """This rank's stream of the shards of the latent index (bad samples skipped and reported: the
    trainer bounds them by ``train.max_bad_samples``)."""
    shards, samples = read_latent_index(inputs.latents)
    params = config["model"]["params"]
    return LatentShardSource(shards, batch_size=plan.batch_size, micro_batches_per_step=plan.accumulation,
                             block_steps=plan.checkpoint_every_steps, shuffle_buffer=config["train"]["shuffle_buffer"],
                             seed=plan.seed, rank=env.rank, num_samples=samples, num_workers=plan.num_workers,
                             pin_memory=env.device.type == "cuda",
                             latent_shape=(2 * params["channels"], params["image_size"], params["image_size"]),
                             skip_bad_samples=True)


def text_conditioner(config: dict, env: DistEnv, inputs: TrainInputs) -> Conditioner:
    """The frozen OpenCLIP text tower with the SD checkpoint's ``cond_stage_model.model.*`` weights, or its
    outputs precomputed once per caption (``train.text_embeddings: precomputed``, bitwise the same)."""
    if inputs.text_embeddings is not None:
        from sdcore.embeddings import conditioner_factory

        return conditioner_factory(inputs.text_embeddings)(config, env, inputs)
    params = config["model"]["params"]["cond_stage_config"]["params"]
    return FrozenTextConditioner(StableDiffusionCheckpoint(inputs.sd_checkpoint).text_encoder(params).to(env.device))


def coco_evaluator(config: dict, env: DistEnv, inputs: TrainInputs) -> Evaluator:
    return Evaluator(config, inputs.eval, env.device, env.rank, env.world_size)


@dataclass(frozen=True)
class Factories:
    """How the trainer builds its data, conditioner and (inline) evaluator; tests substitute small ones."""

    data: Callable[[dict, DistEnv, TrainPlan, TrainInputs], MicroBatchSource] = latent_source
    conditioner: Callable[[dict, DistEnv, TrainInputs], Conditioner] = text_conditioner
    evaluator: Callable[[dict, DistEnv, TrainInputs], Evaluator] = coco_evaluator


def training_inputs(moments: torch.Tensor, seed: int, step: int, micro: int, first_index: int,
                    scale_factor: float, num_timesteps: int):
    """Latent z, timestep t ~ U{0..T-1} and noise for each sample, from its own seeded generator.

    ``first_index`` is the index of the batch's first sample within the micro-batch of all ranks
    (rank x per-rank batch), so a sample gets the same draws whichever rank holds it. The draws are
    made on the CPU (identical on every device) and moved by the caller.
    """
    latents, timesteps, noises = [], [], []
    for i in range(moments.shape[0]):
        generator = torch.Generator().manual_seed(stream_seed(NOISE_SEED_DOMAIN, seed, step, micro, first_index + i))
        z = sample_from_moments(moments[i:i + 1], scale_factor, generator)
        timesteps.append(torch.randint(0, num_timesteps, (1,), generator=generator))
        noises.append(torch.randn(z.shape, generator=generator))
        latents.append(z)
    return torch.cat(latents), torch.cat(timesteps), torch.cat(noises)


def entropy_seed(run_dir: Path) -> int:
    """A seed from the system's entropy, kept in ``train/seed.json`` from the moment it is drawn, so an
    attempt killed before its first state keeps the seed (and the checkpoints) of the one before."""
    path = run_dir / "train" / "seed.json"
    stored = read_json(path, default=None)
    if stored is None:
        stored = {"seed": random.SystemRandom().randrange(2**32), "source": "random.SystemRandom"}
        write_json(path, stored)
    return int(stored["seed"])


def changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested configs."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return keys


def check_resumable(run_dir: Path, state: dict | None, config: dict) -> None:
    """A finished run is never reopened (but its summary, if it is missing, is written again), and a
    started one only continues with its own settings (``RESUMABLE_CHANGES`` aside)."""
    if state is None:
        return
    ways_out = f"train under a new name (--config run_name=NEW) or delete {run_dir} to start it again"
    if state.get("finished") and (run_dir / "train" / "summary.json").exists():
        raise RunError(f"{run_dir}: this run has finished ({state['finished']}); {ways_out}")
    changes = [change for change in changed_keys(state["config"], config)
               if not change.startswith(tuple(f"{key} " for key in RESUMABLE_CHANGES))]
    if changes:
        raise RunError(f"{run_dir}: changed since this run started: {', '.join(changes)}; "
                       f"to keep the change, {ways_out}")


class Trainer:
    """One training run in ``run_dir``: ``run()`` trains (or resumes) to the end; ``step()``,
    ``save_checkpoint()``, ``save_state()`` and ``evaluate()`` are its parts."""

    def __init__(self, config: dict, run_dir: Path, env: DistEnv, inputs: TrainInputs, factories: Factories,
                 preemption: PreemptionFlag):
        self.config, self.run_dir, self.env, self.preemption = config, run_dir, env, preemption
        self.params = config["model"]["params"]
        if self.params["parameterization"] != "v":
            raise ValueError(f"only the v-parameterisation is implemented, got {self.params['parameterization']!r}")
        self.eval_cfg = config["eval"]
        self.inline = self.eval_cfg["mode"] == "inline"
        stored = load_state(run_dir)
        check_resumable(run_dir, stored and stored[0], config)
        seed = stored[0]["plan"]["seed"] if stored else config["train"]["seed"]
        if seed is None:
            seed = broadcast_object(entropy_seed(run_dir) if env.is_main else None, env)
        self.plan = TrainPlan.from_config(config, env.world_size, seed)
        self.fast = FastPaths.from_config(config["train"]["fast_paths"], self.plan.precision)
        warn_if_slow_precision(self.plan.precision, env.device)

        if stored:
            check_mlperf_log_length(run_dir, stored[0])
        self.mlperf = MlperfLogger(run_dir / "train" / "mlperf.log", enabled=env.is_main,
                                   resume_offset=stored[0]["mlperf_log_offset"] if stored else None)
        if not stored:
            self.mlperf.log_init_start(config["mlperf"])
        self._build_model()
        self.data = factories.data(config, env, self.plan, inputs)
        self.conditioner = factories.conditioner(config, env, inputs)
        self.evaluator = factories.evaluator(config, env, inputs) if self.inline else None
        self.max_bad_samples = int(config["train"].get("max_bad_samples", 0))
        self.bad_samples: dict[tuple[str, str], str] = {}  # (shard, key) -> reason, found by any rank
        self.finished_before = None
        if stored:
            self._restore(*stored)
        else:
            self._log_hyperparameters()
            self.step_count, self.train_seconds, self.attempts, self.downtime = 0, 0.0, 1, 0.0
            self.evaluations, self.pending_eval = [], False
        self.last_checkpoint = run_dir / "checkpoints" / f"step_{self.step_count:08d}.safetensors"
        self.history = LossHistory(run_dir / "train" / "loss.csv", env.is_main,
                                   self.step_count if stored else None)
        self.scalars = Scalars(run_dir / "tb" if env.is_main and config["train"]["tensorboard"] else None,
                               self.step_count if stored else None)

    # ---- construction ---------------------------------------------------------------------------

    def _build_model(self) -> None:
        """UNet (randomly initialised from the run's seed), its runnable fast-path form, optimiser,
        LR schedule, grad scaler, noise schedule. Python's and NumPy's global generators are seeded too
        (as the reference's seed_everything does): nothing here draws from them, but the state saves
        them, and unseeded they would differ between two runs of the same seed."""
        torch.manual_seed(self.plan.seed)
        random.seed(self.plan.seed)
        np.random.seed(self.plan.seed % 2**32)
        self.unet = UNetModel(**self.params["unet_config"]["params"]).to(self.env.device)
        # The runnable may wrap the UNet (persistent weight casts); state_dict, the optimiser and
        # evaluation keep using the UNet itself, whose parameters it shares.
        runnable = dataclasses.replace(self.fast, compile=False).apply(self.unet)
        device_ids = [self.env.device.index] if self.env.device.type == "cuda" else None
        self.model = DistributedDataParallel(runnable, device_ids=device_ids) if self.env.is_distributed else runnable
        if self.fast.compile:
            self.model = torch.compile(self.model)
        self.unet.train()
        opt = self.config["train"]["optimizer"]
        self.optimizer = torch.optim.AdamW(self.unet.parameters(), lr=self.plan.learning_rate,
                                           betas=tuple(opt["betas"]), eps=opt["eps"], weight_decay=opt["weight_decay"],
                                           **self.fast.optimizer_options)
        self.lr_schedule = lr_schedule(self.optimizer, self.plan)
        self.scaler = torch.amp.GradScaler(self.env.device.type, enabled=self.plan.precision == "fp16")
        self.schedule = LinearSchedule(self.params["linear_start"], self.params["linear_end"],
                                       self.params["timesteps"]).to(self.env.device)

    def _log_hyperparameters(self) -> None:
        opt = self.config["train"]["optimizer"]
        self.mlperf.log_hyperparameters(
            seed=self.plan.seed, train_samples=self.data.num_samples, eval_samples=self.eval_cfg["num_prompts"],
            gradient_accumulation_steps=self.plan.accumulation, global_batch_size=self.plan.global_batch,
            betas=opt["betas"], eps=opt["eps"], weight_decay=opt["weight_decay"],
            learning_rate=self.plan.learning_rate, warmup_steps=self.plan.warmup_steps)

    def _restore(self, state: dict, unet_state: dict) -> None:
        self.unet.load_state_dict(unet_state)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"][self.env.rank])
        self.step_count, self.train_seconds = state["step"], state["train_seconds"]
        self.attempts = state["attempts"] + 1
        self.evaluations, self.pending_eval = list(state["evaluations"]), state["pending_eval"]
        self.bad_samples = {(shard, key): reason for shard, key, reason in state.get("bad_samples", [])}
        self.finished_before = state.get("finished")
        if self.finished_before:  # killed after its final state, before the workflow saw the job end
            self.attempts, self.downtime = state["attempts"], state["downtime_seconds"]
            return
        self.downtime = state["downtime_seconds"] + max(0.0, time.time() - state["saved_at"])
        self.mlperf.log_resume(self.samples, self.attempts, self.downtime)
        if self.env.is_main:
            log.info("resumed %s at step %d (%d samples), attempt %d, %.1f s after its state was saved",
                     self.run_dir, self.step_count, self.samples, self.attempts, time.time() - state["saved_at"])

    @property
    def samples(self) -> int:
        return self.step_count * self.plan.global_batch

    # ---- the parts of a run ---------------------------------------------------------------------

    def step(self, batches) -> torch.Tensor:
        """One optimiser step over ``accumulation`` micro-batches; returns this rank's mean loss."""
        loss_sum = torch.zeros((), device=self.env.device)
        for micro in range(self.plan.accumulation):
            batch = next(batches)
            z, t, noise = training_inputs(batch.moments, self.plan.seed, self.step_count, micro,
                                          self.env.rank * self.plan.batch_size, self.params["scale_factor"],
                                          self.schedule.num_timesteps)
            z, t, noise = z.to(self.env.device), t.to(self.env.device), noise.to(self.env.device)
            last_micro = micro == self.plan.accumulation - 1
            sync = nullcontext() if last_micro or not self.env.is_distributed else self.model.no_sync()
            with sync:
                with self.fast.autocast_context(self.env.device):
                    context = self.conditioner(batch.captions, self.env.device)
                    prediction = self.model(self.schedule.q_sample(z, t, noise), t, context)
                loss = v_loss(prediction, self.schedule.v_target(z, noise, t))
                self.scaler.scale(loss / self.plan.accumulation).backward()
            loss_sum += loss.detach()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_schedule.step()
        self.step_count += 1
        return loss_sum / self.plan.accumulation

    def save_checkpoint(self) -> Path:
        """The UNet weights of this step for evaluation (rank 0), with the run's position and seed."""
        path = self.run_dir / "checkpoints" / f"step_{self.step_count:08d}.safetensors"
        if self.env.is_main:
            save_unet(path, self.unet.state_dict(), {"step": self.step_count, "samples_seen": self.samples,
                                                     "seed": self.plan.seed, "global_batch": self.plan.global_batch})
        return path

    def save_state(self, checkpoint: Path | None = None, finished: str | None = None) -> None:
        """The resume state on rank 0 (weights and optimiser are the same on every rank; RNGs per rank)."""
        all_rngs = [None] * self.env.world_size
        if self.env.is_distributed:
            torch.distributed.all_gather_object(all_rngs, rng_states())
        else:
            all_rngs[0] = rng_states()
        if self.env.is_main:
            state = {"plan": self.plan.as_dict(), "config": self.config, "step": self.step_count,
                     "optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict(),
                     "scaler": self.scaler.state_dict(), "rng": all_rngs, "mlperf_log_offset": self.mlperf.offset(),
                     "train_seconds": self.train_seconds, "attempts": self.attempts,
                     "downtime_seconds": self.downtime, "saved_at": time.time(),
                     "evaluations": self.evaluations, "pending_eval": self.pending_eval, "finished": finished,
                     "bad_samples": [[shard, key, reason] for (shard, key), reason in sorted(self.bad_samples.items())]}
            save_state(self.run_dir, state, self.unet.state_dict(), checkpoint)
        barrier(self.env)

    def evaluate(self) -> bool:
        """Inline: score the checkpoint at this step (or reuse its stored result); True if it meets the targets."""
        result_path = self.run_dir / "eval" / f"step_{self.step_count:08d}.json"
        stored = broadcast_object(read_eval_results([result_path]) if self.env.is_main else None, self.env)
        self.mlperf.log_eval_start(self.samples)
        if stored:
            result = stored[0]
        else:
            result = self.evaluator.evaluate(self.unet, self.samples, self.plan.seed, samples_png=result_path.with_name(
                f"{result_path.stem}_samples.png"))
            result = {"step": self.step_count, **result}
            if self.env.is_main:  # the record as stored (with its targets), as a resumed run reads it back
                result = write_eval_result(result_path, result, self.eval_cfg)
        self.mlperf.log_eval_result(self.samples, result["fid"], result["clip"])
        self.evaluations.append(result)
        if not stored:
            # A stored result was written to TensorBoard by the attempt that stored it; a resumed run
            # keeps that attempt's events up to its step (Scalars' purge_step), so adding it again
            # would show the checkpoint twice.
            self.scalars.add(self.step_count, **{"eval/FID": result["fid"], "eval/CLIP": result["clip"]})
        passed = targets_met(result, self.eval_cfg)
        if self.env.is_main:
            log.info("checkpoint step %d (%d samples): FID %.3f, CLIP %.4f -> %s", self.step_count, self.samples,
                     result["fid"], result["clip"], "target met" if passed else "target not met")
        return passed

    def target_met_offline(self) -> bool:
        """Offline with stop_on_target: whether an evaluation job found a passing checkpoint (rank 0 looks)."""
        results = read_eval_results(sorted((self.run_dir / "eval").glob("step_*.json")))
        # "skipped" records (a checkpoint the training never reached, written once the summary exists) hold no scores
        return any(targets_met(r, self.eval_cfg) for r in results if "fid" in r)

    # ---- the run --------------------------------------------------------------------------------

    def run(self) -> int:
        """Train to the sample budget or the first passing checkpoint; 0 when done, PREEMPTED_EXIT_CODE when preempted."""
        stop_on_target = self.eval_cfg["stop_on_target"]
        if self.finished_before:
            if self.env.is_main:
                log.warning("%s finished (%s) but its summary is missing: writing it again", self.run_dir,
                            self.finished_before)
                self._write_summary(self.finished_before)
            barrier(self.env)
            return 0
        if self.step_count == 0:
            self.mlperf.log_run_start()
            self.mlperf.log_block_start(0)
        finished = self.step_count >= self.plan.max_steps
        if self.pending_eval:  # a checkpoint saved before an interruption, not yet evaluated
            self.pending_eval = False
            finished = finished or self.evaluate() and stop_on_target
            if not finished:
                self.mlperf.log_block_start(self.samples)
        elif self.step_count > 0 and self.plan.is_checkpoint(self.step_count) and not finished:
            # resumed from the state of a checkpoint (offline mode), which is saved after the block's
            # block_stop and before the next block_start: the log cut back to it lacks that line
            self.mlperf.log_block_start(self.samples)
        batches = self.data.micro_batches(self.step_count)
        upcoming = []
        if not finished:  # the first step's micro-batches, checked for bad samples before it is trained
            upcoming = self._fetch(batches)
            new_bad = self._new_bad_samples(upcoming)
            self._admit_bad_samples(new_bad, self._any_rank(bool(new_bad)), saved=True)
        progress = Progress(self)
        last_poll = time.monotonic()
        target_seen = False
        while not finished:
            started = time.perf_counter()
            loss = self.step(iter(upcoming))
            # The next step's micro-batches, fetched now so the ranks agree on their bad samples in
            # this step's collective, before any of them is trained.
            upcoming = self._fetch(batches) if self.step_count < self.plan.max_steps else []
            new_bad = self._new_bad_samples(upcoming)
            poll = not self.inline and stop_on_target and self.env.is_main \
                and time.monotonic() - last_poll > TARGET_POLL_SECONDS
            last_poll = time.monotonic() if poll else last_poll
            # One collective per step: the mean loss, whether any rank was signalled, whether an
            # offline evaluation met the target, how many new bad samples the next step's data hold.
            flags = torch.stack([loss, torch.tensor(float(self.preemption.requested), device=self.env.device),
                                 torch.tensor(float(poll and self.target_met_offline()), device=self.env.device),
                                 torch.tensor(float(len(new_bad)), device=self.env.device)])
            if self.env.is_distributed:
                torch.distributed.all_reduce(flags)
            mean_loss, preempt, target_seen = flags[0].item() / self.env.world_size, bool(flags[1]), bool(flags[2])
            any_new_bad = bool(flags[3])
            elapsed = time.perf_counter() - started
            self.train_seconds += elapsed
            self._record(mean_loss, elapsed, progress)
            at_checkpoint = self.plan.is_checkpoint(self.step_count)
            if at_checkpoint:
                self.mlperf.log_block_stop(self.samples)
                self.pending_eval = self.inline
                self.last_checkpoint = self.save_checkpoint()
                self.save_state(self.last_checkpoint)
            if preempt:
                return self._preempted(saved=at_checkpoint)
            if at_checkpoint and self.inline:
                self.pending_eval = False
                finished = self.evaluate() and stop_on_target
            finished = finished or target_seen or self.step_count >= self.plan.max_steps
            if not finished:
                self._admit_bad_samples(new_bad, any_new_bad, saved=at_checkpoint)
            if at_checkpoint and not finished:
                self.mlperf.log_block_start(self.samples)
        return self._finish(stopped_by_target=target_seen)

    # ---- bad training samples -------------------------------------------------------------------

    def _fetch(self, batches) -> list:
        return [next(batches) for _ in range(self.plan.accumulation)]

    def _any_rank(self, flag: bool) -> bool:
        if not self.env.is_distributed:
            return flag
        value = torch.tensor(float(flag), device=self.env.device)
        torch.distributed.all_reduce(value)
        return bool(value.item())

    def _new_bad_samples(self, batches) -> list[tuple[str, str, str]]:
        """This rank's bad samples reported with ``batches`` that are not known yet (in stream order)."""
        new, seen = [], set(self.bad_samples)
        for batch in batches:
            for shard, key, reason in getattr(batch, "skipped", None) or ():
                if (shard, key) not in seen:
                    seen.add((shard, key))
                    new.append((shard, key, reason))
        return new

    def _admit_bad_samples(self, new: list, any_rank_has_new: bool, saved: bool) -> None:
        """Add every rank's new bad samples to the run's set; or, if that makes more than
        ``max_bad_samples``, save the state (no step trained so far saw a skip beyond the limit) and
        stop every rank with BadDataError. The state keeps the set within the limit, so a rerun once
        the shards are mended continues as if they had never been damaged."""
        if not any_rank_has_new:
            return
        gathered = [None] * self.env.world_size
        if self.env.is_distributed:
            torch.distributed.all_gather_object(gathered, new)
        else:
            gathered[0] = new
        merged = dict(self.bad_samples)
        for entries in gathered:
            for shard, key, reason in entries:
                merged.setdefault((shard, key), reason)
        fresh = [(shard, key, merged[(shard, key)]) for shard, key in sorted(set(merged) - set(self.bad_samples))]
        if len(merged) > self.max_bad_samples:
            if not saved:
                self.save_state()
            listed = "; ".join(reason for _, _, reason in fresh[:MAX_LISTED_BAD_SAMPLES])
            more = f" and {len(fresh) - MAX_LISTED_BAD_SAMPLES} more" if len(fresh) > MAX_LISTED_BAD_SAMPLES else ""
            shards = ", ".join(sorted({shard for shard, _, _ in fresh}))
            raise BadDataError(
                f"{len(merged)} bad training sample(s), more than train.max_bad_samples = {self.max_bad_samples}: "
                f"{listed}{more} (shards: {shards}). Training stopped before step {self.step_count + 1} and saved "
                f"its state: mend or replace the shards, or raise train.max_bad_samples, and run again to resume")
        self.bad_samples = merged
        if self.env.is_main:
            for _, _, reason in fresh:
                log.warning("skipping bad training sample %d of at most %d: %s", len(merged), self.max_bad_samples,
                            reason)

    def _record(self, mean_loss: float, seconds: float, progress: "Progress") -> None:
        lr = self._lr_of_last_step()
        self.history.append(self.step_count, self.samples, mean_loss, lr)
        progress.report(mean_loss, lr, seconds)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scalars.add(self.step_count, **{"train/loss": mean_loss, "train/lr": lr, "train/grad_scale": scale,
                                             "train/samples_per_second": self.plan.global_batch / seconds})

    def _lr_of_last_step(self) -> float:
        """The learning rate the step just taken used (the schedule has already moved on)."""
        return self.plan.learning_rate * self.lr_schedule.lr_lambdas[0](self.step_count - 1)

    def _preempted(self, saved: bool) -> int:
        if not saved:
            self.save_state()
        if self.env.is_main:
            log.warning("preempted at step %d: state saved in %s", self.step_count, self.run_dir / "train")
        return PREEMPTED_EXIT_CODE

    def _finish(self, stopped_by_target: bool) -> int:
        """End of the timed run: inline mode logs run_stop. The summary (the job's declared output) comes
        before the finished mark, so a crash between the two leaves a run that finishes again when retried."""
        success = any(targets_met(e, self.eval_cfg) for e in self.evaluations)
        if self.inline:
            self.mlperf.log_run_stop(self.samples, success=success)
        status = ("success" if success else "aborted") if self.inline else \
            ("stopped: an evaluation met the target" if stopped_by_target else "sample budget reached")
        if self.env.is_main:
            self._write_summary(status)
            log.info("training finished (%s) after %d samples", status, self.samples)
        at_checkpoint = self.plan.is_checkpoint(self.step_count)
        self.save_state(self.last_checkpoint if at_checkpoint else None, finished=status)
        return 0

    def _write_summary(self, status: str) -> None:
        train_dir = self.run_dir / "train"
        plot_loss(train_dir / "loss.csv", train_dir / "loss.png")
        write_json(train_dir / "summary.json", {
            "status": status, "mode": self.eval_cfg["mode"], "seed": self.plan.seed,
            "steps": self.step_count, "samples_seen": self.samples, "world_size": self.env.world_size,
            "global_batch_size": self.plan.global_batch, "learning_rate": self.plan.learning_rate,
            "precision": self.plan.precision, "train_seconds": self.train_seconds,
            "samples_per_second": self.samples / self.train_seconds if self.train_seconds else None,
            "attempts": self.attempts, "downtime_seconds": self.downtime, "final_loss": self.history.last_loss(),
            "checkpoints": [f"step_{s:08d}" for s in self.plan.checkpoint_steps if s <= self.step_count],
            "evaluations": self.evaluations,
            "bad_samples_skipped": [{"shard": shard, "key": key, "reason": reason}
                                    for (shard, key), reason in sorted(self.bad_samples.items())],
        })


def check_mlperf_log_length(run_dir: Path, state: dict) -> None:
    """The training log must still hold what the state says was written (the resume cuts it back to
    that length; truncating a shorter log would pad it with zero bytes)."""
    path = run_dir / "train" / "mlperf.log"
    size = path.stat().st_size if path.exists() else None
    if size is None or size < state["mlperf_log_offset"]:
        raise RunError(f"{path}: {'missing' if size is None else f'{size} bytes'}, but the state of step "
                       f"{state['step']} was saved after {state['mlperf_log_offset']} bytes of it: the log was cut "
                       f"or replaced, so the run cannot be resumed; delete {run_dir} to start it again")


class _RunLock:
    """Rank 0's flock of ``<run_dir>/.train.lock`` for one attempt (``run_lock``)."""

    def __init__(self, run_dir: Path, env: DistEnv):
        self.run_dir, self.env, self.file = run_dir, env, None

    def __enter__(self):
        error = self._acquire() if self.env.is_main else None
        error = broadcast_object(error, self.env)
        if error:
            self.__exit__(None, None, None)
            raise RunError(error)
        if self.env.is_main:
            remove_stale_temporaries(self.run_dir)
        return self

    def _acquire(self) -> str | None:
        path = self.run_dir / LOCK_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            self.file = None
            return (f"{self.run_dir} is being trained by {holder} (it holds {path}); one trainer per run "
                    "directory: wait for that one to end, or end it, and run again")
        except OSError as error:  # a file system without locks (some network mounts): go on unguarded
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
            log.warning("%s: cannot lock (%s); nothing keeps a second trainer out of %s", path, error, self.run_dir)
            return None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self.file.flush()
        return None

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()  # releases the flock
            self.file = None
        return False


def run_lock(run_dir: Path, env: DistEnv) -> _RunLock:
    """One trainer per run directory. Rank 0 takes an exclusive flock of ``<run_dir>/.train.lock``
    (released when it exits, however it exits) before anything of the run is read or written; a
    second trainer, e.g. a retry started while the ranks of a killed attempt still run, stops on
    every rank with a RunError naming the holder. Then the temporaries of killed writes go."""
    return _RunLock(run_dir, env)


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Delete the hidden ``.<name>.<pid>.tmp<suffix>`` files (sdcore.files) in ``train/`` and
    ``checkpoints/``, which attempts killed while writing leave behind (a UNet checkpoint of the
    real benchmark is 3.4 GB): only the trainer writes there, and it holds the run's lock."""
    removed = []
    for folder in (run_dir / "train", run_dir / "checkpoints"):
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if is_temporary(path.name) and path.is_file():
                    path.unlink()
                    removed.append(path)
    if removed:
        log.info("removed %d temporary file(s) of interrupted writes: %s", len(removed),
                 ", ".join(str(p) for p in removed))
    return removed


class Progress:
    """The progress line on rank 0 (samples/s, loss, ETA to the budget) and the loss curve redrawn
    every ``train.plot_every_steps`` steps, so a long run can be watched as it goes."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.last_report, self.samples, self.seconds = time.monotonic(), 0, 0.0
        self.plot_every = trainer.config["train"]["plot_every_steps"]

    def report(self, mean_loss: float, lr: float, seconds: float) -> None:
        t = self.trainer
        self.samples += t.plan.global_batch
        self.seconds += seconds
        if not t.env.is_main:
            return
        if t.step_count % self.plot_every == 0:
            plot_loss(t.history.path, t.run_dir / "train" / "loss.png")
        if time.monotonic() - self.last_report > PROGRESS_EVERY_SECONDS or t.step_count in (1, t.plan.max_steps) \
                or t.plan.is_checkpoint(t.step_count):
            rate = self.samples / self.seconds
            budget = t.plan.max_steps * t.plan.global_batch
            log.info("step %d/%d  samples %d/%d (%.0f%%)  %.1f samples/s  loss %.4f  lr %.3e  ETA %s",
                     t.step_count, t.plan.max_steps, t.samples, budget, 100 * t.samples / budget, rate,
                     mean_loss, lr, format_duration((budget - t.samples) / rate))
            self.last_report, self.samples, self.seconds = time.monotonic(), 0, 0.0


def main(config: dict, run_dir, inputs: TrainInputs = TrainInputs(), factories: Factories = Factories()) -> int:
    """Train (or resume) the run in ``run_dir``; returns 0 when done, PREEMPTED_EXIT_CODE when preempted."""
    env = init_distributed(config["launch"])
    log.info("rank %d of %d (local rank %d of %d, launcher %s, host %s, device %s, %d CPU threads)", env.rank,
             env.world_size, env.local_rank, env.local_world_size, env.launcher, socket.gethostname(), env.device,
             torch.get_num_threads())
    with ExitStack() as cleanup:
        cleanup.callback(shutdown, env)
        cleanup.enter_context(run_lock(Path(run_dir), env))
        preemption = PreemptionFlag()
        cleanup.callback(preemption.close)
        trainer = Trainer(config, Path(run_dir), env, inputs, factories, preemption)
        cleanup.callback(trainer.mlperf.close)
        cleanup.callback(trainer.scalars.close)
        return trainer.run()
