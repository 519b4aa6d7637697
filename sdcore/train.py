"""Training loop of the MLPerf text-to-image benchmark (SPEC sections 3-5), top to bottom.

One function, ``main``, does what the reference's Lightning setup does: AdamW on the UNet only,
learning rate = base rate x global batch with a linear warm-up (the reference's
LambdaLinearScheduler), fp16 autocast with a GradScaler (or fp32 / bf16), DDP across ranks,
gradient accumulation, v-objective loss, a checkpoint and an evaluation every
``ceil(checkpoint_every_samples / global_batch)`` steps, and a stop at the first checkpoint that
meets both quality targets or at ``max_samples``.

Exact resumption. Nothing random in a step comes from a global RNG: the data stream of a
rank is a function of the step (``sdcore.data``), and the latent, timestep and noise of every
sample come from a generator seeded by (seed, step, micro-batch, global sample index). A run
restored from a checkpoint (weights, optimiser, scaler, LR scheduler, step) therefore continues
bit for bit like a run that never stopped. The global RNG states are saved and restored as well,
for any code that does use them. The sample index is global, so the trajectory depends on the
global batch and not on how it is split across ranks.

Files in the run directory:
  resume.pt                 full training state, replaced atomically at every checkpoint and on preemption
  checkpoints/step_N.pt     UNet weights of each evaluation checkpoint (what offline evaluation reads)
  eval/step_N.json          FID/CLIP of each checkpoint
  mlperf.log, loss.csv, loss.png, summary.json

Preemption: SIGTERM or SIGUSR1 sets a flag; at the next step boundary the ranks agree on it,
write ``resume.pt`` and exit with ``PREEMPTED_EXIT_CODE`` so a retry or requeue resumes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import math
import os
import random
import signal
import socket
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from sdcore.autoencoder import sample_from_moments
from sdcore.checkpoint import TEXT_ENCODER_PREFIX, load_part, load_state_dict_file
from sdcore.data import (Conditioner, FrozenTextConditioner, LatentShardSource, MicroBatchSource,
                         shard_paths, stream_seed)
from sdcore.diffusion import LinearSchedule, v_loss
from sdcore.distributed import DistEnv, barrier, broadcast_object, init_distributed, shutdown
from sdcore.evaluate import EvalPaths, Evaluator, targets_met
from sdcore.mlperf_log import MlperfLogger
from sdcore.precision import FastPaths
from sdcore.unet import UNetModel

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later"; a retry resumes from resume.pt
NOISE_SEED_DOMAIN = 2     # keeps the per-sample noise seeds apart from the data-stream seeds
PROGRESS_EVERY_SECONDS = 10.0


@dataclass(frozen=True)
class TrainPlan:
    """The numbers derived from the config and the world size."""

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
    def from_config(cls, config: dict, world_size: int) -> "TrainPlan":
        train = config["train"]
        global_batch = world_size * train["batch_size"] * train["gradient_accumulation_steps"]
        return cls(
            seed=train["seed"],
            world_size=world_size,
            batch_size=train["batch_size"],
            accumulation=train["gradient_accumulation_steps"],
            global_batch=global_batch,
            learning_rate=config["model"]["base_learning_rate"] * global_batch,
            warmup_steps=train["warmup_steps"],
            warmup_start_factor=train["warmup_start_factor"],
            checkpoint_every_steps=math.ceil(train["checkpoint_every_samples"] / global_batch),
            max_steps=math.ceil(train["max_samples"] / global_batch),
            precision=train["precision"],
            num_workers=train["num_workers"],
        )


def warmup_factor(step: int, warmup_steps: int, start_factor: float) -> float:
    """LR factor of optimizer step ``step`` (0-based), exactly the reference's LambdaLinearScheduler
    with f_start=start_factor, f_max=f_min=1: ``(1 - f_start) / W * n + f_start`` while n < W, then 1.
    """
    if step < warmup_steps:
        return (1.0 - start_factor) / warmup_steps * step + start_factor
    return 1.0


def training_inputs(moments: torch.Tensor, seed: int, step: int, micro: int, first_index: int,
                    scale_factor: float, num_timesteps: int):
    """Latent z, timestep t ~ U{0..T-1} and noise for each sample, from its own seeded generator.

    ``first_index`` is the index of the batch's first sample within the micro-batch of all ranks
    (rank x per-rank batch), so a sample gets the same draws whichever rank holds it. The draws are
    made on the CPU (identical on every device) and moved by the caller. torch's CPU generator keeps
    the low 32 bits of a seed, so among millions of samples some pairs share their draws; they are
    different latents, so this biases nothing.
    """
    latents, timesteps, noises = [], [], []
    for i in range(moments.shape[0]):
        generator = torch.Generator().manual_seed(stream_seed(NOISE_SEED_DOMAIN, seed, step, micro, first_index + i))
        z = sample_from_moments(moments[i:i + 1], scale_factor, generator)
        timesteps.append(torch.randint(0, num_timesteps, (1,), generator=generator))
        noises.append(torch.randn(z.shape, generator=generator))
        latents.append(z)
    return torch.cat(latents), torch.cat(timesteps), torch.cat(noises)


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


def atomic_save(obj, path: str) -> None:
    """torch.save to a temporary name in the same directory, fsync, then rename over ``path``."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(text: str, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


class PreemptionFlag:
    """Set by SIGTERM / SIGUSR1; the loop polls it at step boundaries. Restores the old handlers on close."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.requested = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}

    def _handle(self, signum, frame) -> None:
        log.warning("received %s: checkpointing at the next step boundary", signal.Signals(signum).name)
        self.requested = True

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class LossHistory:
    """loss.csv (step, samples, loss, lr), appended by rank 0, cut back to the resumed step."""

    FIELDS = ("step", "samples", "loss", "lr")

    def __init__(self, path: str, enabled: bool, resume_step: int | None):
        self.path = path
        self.enabled = enabled
        if not enabled:
            return
        rows = []
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, self.FIELDS)
            writer.writeheader()
            writer.writerows(rows)

    def append(self, step: int, samples: int, loss: float, lr: float) -> None:
        if self.enabled:
            with open(self.path, "a", newline="") as f:
                csv.writer(f).writerow([step, samples, f"{loss:.8g}", f"{lr:.8g}"])

    def plot(self, png_path: str) -> None:
        """Loss per step (and a running mean) as a PNG."""
        if not self.enabled:
            return
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with open(self.path) as f:
            rows = list(csv.DictReader(f))
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
        ax.set_title("training loss")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = png_path + ".tmp.png"
        fig.savefig(tmp, dpi=100)
        plt.close(fig)
        os.replace(tmp, png_path)


def build_unet(config: dict, plan: TrainPlan) -> UNetModel:
    """The UNet from the reference's ``unet_config.params``, randomly initialised from the run's seed."""
    torch.manual_seed(plan.seed)
    return UNetModel(**config["model"]["params"]["unet_config"]["params"])


def latent_source(config: dict, env: DistEnv, plan: TrainPlan) -> LatentShardSource:
    """The latent shards of every configured LAION part, resampled per rank."""
    data_dir = os.path.join(config["paths"]["data"], "laion400m", "latents")
    manifests = [os.path.join(data_dir, part.removesuffix(".parquet"), "manifest.json")
                 for part in config["laion"]["metadata"]["parts"]]
    train = config["train"]
    return LatentShardSource(
        shard_paths(manifests),
        batch_size=plan.batch_size,
        micro_batches_per_step=plan.accumulation,
        block_steps=plan.checkpoint_every_steps,
        shuffle_buffer=train["shuffle_buffer"],
        seed=plan.seed,
        rank=env.rank,
        num_workers=plan.num_workers,
        pin_memory=env.device.type == "cuda",
        num_samples=sum(_read_json(m)["samples"] for m in manifests),
    )


def text_conditioner(config: dict, env: DistEnv) -> FrozenTextConditioner:
    """The frozen OpenCLIP text tower with the weights of the SD checkpoint (``cond_stage_model.model.*``)."""
    from sdcore.text_encoder import FrozenOpenCLIPText  # here: open_clip takes seconds to import

    params = config["model"]["params"]["cond_stage_config"]["params"]
    encoder = FrozenOpenCLIPText(params["arch"], max_length=params["max_length"])
    ckpt = EvalPaths.from_config(config).sd_checkpoint
    load_part(encoder, load_state_dict_file(ckpt), TEXT_ENCODER_PREFIX, "text encoder")
    return FrozenTextConditioner(encoder.to(env.device))


def coco_evaluator(config: dict, env: DistEnv) -> Evaluator:
    """FID and CLIP score over the COCO prompts, each rank scoring its share."""
    return Evaluator(config, env.device, env.rank, env.world_size)


def main(
    config: dict,
    run_dir: str,
    *,
    device: str = "auto",
    make_data_source: Callable[[dict, DistEnv, TrainPlan], MicroBatchSource] = latent_source,
    make_conditioner: Callable[[dict, DistEnv], Conditioner] = text_conditioner,
    make_evaluator: Callable[[dict, DistEnv], Evaluator] = coco_evaluator,
) -> int:
    """Train (or resume) the run in ``run_dir``; returns 0 when done, PREEMPTED_EXIT_CODE when preempted.

    The ``make_*`` factories build the data source, conditioner and evaluator from the config;
    tests replace them with small deterministic ones.
    """
    env = init_distributed(device)
    log.info("rank %d of %d (local rank %d, launcher %s, host %s, device %s, %d CPU threads)", env.rank,
             env.world_size, env.local_rank, env.launcher, socket.gethostname(), env.device, torch.get_num_threads())
    with ExitStack() as cleanup:
        cleanup.callback(shutdown, env)
        preemption = PreemptionFlag()
        cleanup.callback(preemption.close)
        return _train(config, run_dir, env, preemption, cleanup, make_data_source, make_conditioner, make_evaluator)


def _train(config, run_dir, env, preemption, cleanup, make_data_source, make_conditioner, make_evaluator) -> int:
    plan = TrainPlan.from_config(config, env.world_size)
    params = config["model"]["params"]
    if params["parameterization"] != "v":
        raise ValueError(f"only the v-parameterisation is implemented, got {params['parameterization']!r}")
    resume_path = os.path.join(run_dir, "resume.pt")
    state = torch.load(resume_path, map_location="cpu", weights_only=True) if os.path.exists(resume_path) else None
    if state is not None and state["plan"] != dataclasses.asdict(plan):
        raise ValueError(f"{resume_path} was written with {state['plan']}, this launch has {dataclasses.asdict(plan)}")

    # ---- init (untimed): log header, models, optimiser, data, evaluator -------------------------
    mlperf = MlperfLogger(os.path.join(run_dir, "mlperf.log"), enabled=env.is_main,
                          resume_offset=None if state is None else state["mlperf_log_offset"])
    cleanup.callback(mlperf.close)
    if state is None:
        mlperf.log_init_start(config["mlperf"])

    unet = build_unet(config, plan).to(env.device)
    fast = FastPaths.from_config(config["train"]["fast_paths"], plan.precision)
    # The runnable may wrap the UNet (persistent weight casts); state_dict, the optimizer and the
    # evaluator keep using the UNet itself, whose parameters it shares.
    runnable = dataclasses.replace(fast, compile=False).apply(unet)
    model = DistributedDataParallel(runnable, device_ids=[env.device.index] if env.device.type == "cuda" else None) \
        if env.is_distributed else runnable
    if fast.compile:
        model = torch.compile(model)
    unet.train()

    opt_cfg = config["train"]["optimizer"]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=plan.learning_rate, betas=tuple(opt_cfg["betas"]),
                                  eps=opt_cfg["eps"], weight_decay=opt_cfg["weight_decay"])
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda n: warmup_factor(n, plan.warmup_steps, plan.warmup_start_factor))
    scaler = torch.amp.GradScaler(env.device.type, enabled=plan.precision == "fp16")
    schedule = LinearSchedule(params["linear_start"], params["linear_end"], params["timesteps"]).to(env.device)

    source = make_data_source(config, env, plan)
    conditioner = make_conditioner(config, env)
    evaluator = make_evaluator(config, env)

    if state is None:
        mlperf.log_hyperparameters(
            seed=plan.seed, train_samples=source.num_samples, eval_samples=config["eval"]["num_prompts"],
            gradient_accumulation_steps=plan.accumulation, global_batch_size=plan.global_batch,
            betas=opt_cfg["betas"], eps=opt_cfg["eps"], weight_decay=opt_cfg["weight_decay"],
            learning_rate=plan.learning_rate, warmup_steps=plan.warmup_steps)
        step, train_seconds, evaluations, pending_eval = 0, 0.0, [], False
    else:
        unet.load_state_dict(state["unet"])
        optimizer.load_state_dict(state["optimizer"])
        lr_schedule.load_state_dict(state["lr_schedule"])
        scaler.load_state_dict(state["scaler"])
        set_rng_states(state["rng"][env.rank])
        step, train_seconds = state["step"], state["train_seconds"]
        evaluations, pending_eval = list(state["evaluations"]), state["pending_eval"]
        if env.is_main:
            log.info("resumed from %s at step %d (%d samples)", resume_path, step, step * plan.global_batch)
    history = LossHistory(os.path.join(run_dir, "loss.csv"), env.is_main, None if state is None else step)

    def save_training_state(pending: bool) -> None:
        """resume.pt on rank 0 (all ranks hold the same weights and optimiser state; RNGs per rank)."""
        all_rngs = [None] * env.world_size
        if env.is_distributed:
            torch.distributed.all_gather_object(all_rngs, rng_states())
        else:
            all_rngs[0] = rng_states()
        if env.is_main:
            atomic_save({
                "plan": dataclasses.asdict(plan), "step": step, "samples_seen": step * plan.global_batch,
                "unet": unet.state_dict(), "optimizer": optimizer.state_dict(),
                "lr_schedule": lr_schedule.state_dict(), "scaler": scaler.state_dict(), "rng": all_rngs,
                "mlperf_log_offset": mlperf.offset(), "train_seconds": train_seconds,
                "evaluations": evaluations, "pending_eval": pending,
            }, resume_path)
        barrier(env)

    def evaluate_checkpoint() -> bool:
        """Score the checkpoint at ``step`` (or reuse its stored result); True if it meets both targets."""
        samples = step * plan.global_batch
        result_path = os.path.join(run_dir, "eval", f"step_{step:08d}.json")
        stored = broadcast_object(_read_json(result_path) if env.is_main else None, env)
        mlperf.log_eval_start(samples)
        if stored is None:
            stored = {"step": step, "samples_seen": samples, **evaluator.evaluate(unet, samples)}
            if env.is_main:
                atomic_write_text(json.dumps(stored, indent=2), result_path)
        mlperf.log_eval_result(samples, stored["fid"], stored["clip"])
        evaluations.append(stored)
        passed = targets_met(stored, config["eval"])
        if env.is_main:
            log.info("checkpoint step %d (%d samples): FID %.3f, CLIP %.4f -> %s", step, samples,
                     stored["fid"], stored["clip"], "target met" if passed else "target not met")
            history.plot(os.path.join(run_dir, "loss.png"))
        return passed

    if state is None:
        mlperf.log_run_start()
        mlperf.log_block_start(0)

    # ---- training (timed) -----------------------------------------------------------------------
    target_met = pending_eval and evaluate_checkpoint()
    finished = target_met and config["eval"]["stop_on_target"] or step >= plan.max_steps
    if pending_eval and not finished:
        mlperf.log_block_start(step * plan.global_batch)
    batches = source.micro_batches(step)
    last_report = time.monotonic()
    report_samples, report_seconds = 0, 0.0
    while not finished:
        step_start = time.perf_counter()
        loss_sum = torch.zeros((), device=env.device)
        for micro in range(plan.accumulation):
            batch = next(batches)
            z, t, noise = training_inputs(batch.moments, plan.seed, step, micro, env.rank * plan.batch_size,
                                          params["scale_factor"], schedule.num_timesteps)
            z, t, noise = z.to(env.device), t.to(env.device), noise.to(env.device)
            last_micro = micro == plan.accumulation - 1
            sync = nullcontext() if last_micro or not env.is_distributed else model.no_sync()
            with sync:
                with fast.autocast_context(env.device):
                    context = conditioner(batch.captions, env.device)
                    prediction = model(schedule.q_sample(z, t, noise), t, context)
                loss = v_loss(prediction, schedule.v_target(z, noise, t))
                scaler.scale(loss / plan.accumulation).backward()
            loss_sum += loss.detach()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=fast.grads_set_to_none)
        lr = optimizer.param_groups[0]["lr"]
        # Stepped even when the scaler skipped the update (inf/NaN gradients), as Lightning does
        # in the reference (Lightning issues #5558, #18828): the warm-up counts optimizer calls.
        lr_schedule.step()
        step += 1

        # One collective per step: the mean loss across ranks and whether any rank was signalled.
        stats = torch.stack([loss_sum / plan.accumulation, torch.tensor(float(preemption.requested), device=env.device)])
        if env.is_distributed:
            torch.distributed.all_reduce(stats)
        mean_loss, preempt = stats[0].item() / env.world_size, stats[1].item() > 0
        elapsed = time.perf_counter() - step_start
        train_seconds += elapsed
        report_samples += plan.global_batch
        report_seconds += elapsed
        history.append(step, step * plan.global_batch, mean_loss, lr)
        at_checkpoint = step % plan.checkpoint_every_steps == 0 or step >= plan.max_steps
        if env.is_main and (time.monotonic() - last_report > PROGRESS_EVERY_SECONDS or at_checkpoint or step == 1):
            log.info("step %d/%d  samples %d  %.1f samples/s  loss %.4f  lr %.3e", step, plan.max_steps,
                     step * plan.global_batch, report_samples / report_seconds, mean_loss, lr)
            last_report, report_samples, report_seconds = time.monotonic(), 0, 0.0

        if at_checkpoint:
            mlperf.log_block_stop(step * plan.global_batch)
            if env.is_main:
                atomic_save({"unet": unet.state_dict(), "step": step, "samples_seen": step * plan.global_batch},
                            os.path.join(run_dir, "checkpoints", f"step_{step:08d}.pt"))
            save_training_state(pending=True)
        if preempt:
            if not at_checkpoint:
                save_training_state(pending=False)
            if env.is_main:
                log.warning("preempted at step %d: state saved to %s", step, resume_path)
            return PREEMPTED_EXIT_CODE
        if at_checkpoint:
            target_met = evaluate_checkpoint()
            finished = target_met and config["eval"]["stop_on_target"] or step >= plan.max_steps
            if not finished:
                mlperf.log_block_start(step * plan.global_batch)

    # ---- end of run ------------------------------------------------------------------------------
    success = any(targets_met(e, config["eval"]) for e in evaluations)
    mlperf.log_run_stop(step * plan.global_batch, success=success)
    if env.is_main:
        history.plot(os.path.join(run_dir, "loss.png"))
        summary = {
            "status": "success" if success else "aborted",
            "steps": step,
            "samples_seen": step * plan.global_batch,
            "world_size": env.world_size,
            "global_batch_size": plan.global_batch,
            "learning_rate": plan.learning_rate,
            "precision": plan.precision,
            "train_seconds": train_seconds,
            "samples_per_second": step * plan.global_batch / train_seconds if train_seconds else None,
            "final_loss": _last_loss(history.path),
            "evaluations": evaluations,
            "targets": {"fid_target": config["eval"]["fid_target"], "clip_target": config["eval"]["clip_target"]},
            "mlperf_log": os.path.join(run_dir, "mlperf.log"),
            "loss_csv": history.path,
            "loss_png": os.path.join(run_dir, "loss.png"),
        }
        atomic_write_text(json.dumps(summary, indent=2), os.path.join(run_dir, "summary.json"))
        log.info("run finished: %s after %d samples", summary["status"], summary["samples_seen"])
    barrier(env)
    return 0


def _read_json(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _last_loss(csv_path: str) -> float | None:
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["loss"]) if rows else None


def run_report(run_dir: str) -> str:
    """The readable end-of-run summary: throughput, loss curve, FID/CLIP per checkpoint, MLPerf log and verdicts."""
    with open(os.path.join(run_dir, "summary.json")) as f:
        summary = json.load(f)
    targets = summary["targets"]
    lines = [
        f"run {run_dir}: {summary['status']} after {summary['samples_seen']} samples "
        f"({summary['steps']} steps, global batch {summary['global_batch_size']}, {summary['world_size']} ranks, "
        f"{summary['precision']})",
        f"throughput: {summary['samples_per_second']:.2f} samples/s over {summary['train_seconds']:.1f} s of "
        f"training (evaluation excluded)",
        f"loss: final {summary['final_loss']:.4f}; curve {summary['loss_png']} (data {summary['loss_csv']})",
        f"checkpoints (target FID <= {targets['fid_target']:g} and CLIP >= {targets['clip_target']:g}):",
        f"  {'step':>8} {'samples':>10} {'FID':>10} {'CLIP':>8}  target",
    ]
    for e in summary["evaluations"]:
        met = targets_met(e, targets)
        lines.append(f"  {e['step']:>8} {e['samples_seen']:>10} {e['fid']:>10.3f} {e['clip']:>8.4f}  "
                     f"{'met' if met else 'not met'}")
    lines.append(f"MLPerf log: {summary['mlperf_log']}")
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("mlperf_check") and name.endswith(".txt"):
            with open(os.path.join(run_dir, name)) as f:
                verdicts = [line.strip() for line in f if line.startswith("verdict")]
            lines.extend(f"{name}: {v}" for v in verdicts)
    return "\n".join(lines) + "\n"
