"""Benchmark (not a test): full-size SD2 UNet training step, sdcore vs diffusers, on this machine.

Times forward + backward (MSE to a fixed target, gradients of every parameter; the optimizer step,
the same for both implementations, is not timed) at the MLPerf UNet size, batch 4 at a 32x32 latent
by default, for these contenders:

  * sdcore, faithful fp32 eager (math attention: the reference's fp32 softmax);
  * sdcore fp32 with sdpa attention;
  * sdcore fp32 with the fast paths that ``sdcore.precision.recommend_fast_paths`` picks for this
    CPU (its choice is printed), and the same with native convolutions where it picks Winograd ones
    (``conv_winograd_min_pixels``, ``conv_winograd4_min_pixels``), the same with the Winograd
    thresholds it picks for the other kernel capability (AVX2 / AVX-512), and the same with F(2x2, 3x3)
    where it picks F(4x4, 3x3), so those choices are measured too. The Winograd products do 2.25x
    (F(2x2, 3x3)) or 4x (F(4x4, 3x3)) fewer FLOPs than the convolutions they replace; the FLOPs per
    sample are the convolutions', so a Winograd path's "% of peak" is an effective rate and can pass what its kernels run at;
  * diffusers' UNet2DConditionModel at the SD2 architecture, fp32 (and fp32 + channels-last, so a
    memory-format gain is not credited to sdcore alone). diffusers cannot build the MLPerf 16-group
    GroupNorm of the residual blocks: it is built with 32 groups (same parameters, same FLOPs);
  * only where bf16 matmul is faster than fp32 here (AMX, AVX-512 BF16 on AMD): sdcore bf16 autocast, sdcore's fastest
    bf16 path (the recommended one: sdpa + conv GEMMs on small maps + persistent weight casts) and
    diffusers bf16 autocast. On a CPU without fast bf16 they are skipped, and said so.

The contenders alternate within each repetition, in one process; each figure is the best
(minimum) step time over the repetitions, so a burst of load from other processes costs a
repetition, not the result; the ratio to diffusers bf16 is also given per repetition (median and
range), since this machine's speed can move by a third within minutes. Each repetition's line gives
the step's minor page faults: a fresh page costs microseconds. The heap policy is the whole
process's: ``keep_freed_memory`` (what ``recommend_fast_paths`` picks on a CPU; the trainer sets it
with ``train.fast_paths.keep_freed_memory``) is set once before the first contender, so every contender, diffusers' too, runs
without page faults; ``--default-heap`` keeps glibc's default instead, under which each step
page-faults its large blocks in again (a third of the fp32 step) and how many depends on what
earlier contenders left in the allocator. Gradients are freed after every contender's steps (and
persistent-cast buffers dropped), so the models of all contenders fit in memory together (24 GB). FLOPs per sample
are counted once (torch.utils.flop_counter, sdcore fp32 with math attention) and the share of the
measured matmul peak of each contender's precision is printed.

    python benchmarks/unet_train_step.py [--repeats 3] [--steps 1] [--no-diffusers] [--op-times NAME] [--compile]
                                         [--default-heap]

``--compile`` adds sdcore through torch.compile (``train.fast_paths.compile``, sdpa, bf16 where bf16
is fast); its first step, the compilation, is the untimed warm-up.

``--op-times NAME`` times one step of the contender whose name contains NAME operator by operator
(each aten call between two clock reads, the third step, no profiler) and prints the time, FLOPs and
GFLOP/s of each class of operators and of the costliest operator shapes: where the step's time goes
and how near each kind of kernel runs to the matmul peak. torch.profiler was not used for this: under
it some oneDNN convolution backwards took several times as long (measured on an AMD EPYC: the
stride-2 1280-channel one 208-217 ms profiled, 27-31 ms timed alone in the same step).
Needs the `bench` extra: pip install diffusers.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import resource
import statistics
import time
from dataclasses import dataclass
from typing import Callable

from machine import MachineInfo  # benchmarks/machine.py; also puts the repository on sys.path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

from sdcore.precision import FastPaths, keep_freed_memory, recommend_fast_paths
from sdcore.unet import UNetModel

SD2_UNET_PARAMS = {
    "use_checkpoint": False, "use_fp16": True, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "attention_resolutions": [4, 2, 1], "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "use_spatial_transformer": True,
    "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": 1024, "legacy": False,
}
CONTEXT_LEN, CONTEXT_DIM = 77, 1024
GOAL_VS_DIFFUSERS_FP32 = 1.3
GOAL_VS_DIFFUSERS_BF16 = 1.6


def build_sdcore() -> torch.nn.Module:
    return UNetModel(**SD2_UNET_PARAMS)


def build_diffusers() -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        # diffusers' attention_head_dim is a head *count* for SD2 configs: channels / 64.
        attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True,
        norm_num_groups=32, act_fn="silu",
    )


class DiffusersAdapter(torch.nn.Module):
    """Gives diffusers' UNet the (x, t, context) -> tensor call of sdcore's."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context):
        return self.unet(x, t, encoder_hidden_states=context, return_dict=False)[0]


def inputs(batch: int, latent: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, latent, latent, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    context = torch.randn(batch, CONTEXT_LEN, CONTEXT_DIM, generator=gen)
    target = torch.randn(batch, 4, latent, latent, generator=gen)
    return [x, t, context, target]


def train_step(model, fast_paths: FastPaths, x, t, context, target) -> None:
    with fast_paths.autocast_context("cpu"):
        out = model(x, t, context)
    torch.nn.functional.mse_loss(out.float(), target).backward()


@dataclass
class Contender:
    name: str
    family: str                 # "sdcore" | "diffusers"
    fast_paths: FastPaths
    model: Callable[[], torch.nn.Module]  # the shared module of its family
    best: float = float("inf")  # seconds per step
    times: list[float] = dataclasses.field(default_factory=list)  # seconds per step, one per repetition
    runnable: torch.nn.Module | None = None

    @property
    def precision(self) -> str:
        return self.fast_paths.autocast or "fp32"

    def prepare(self) -> torch.nn.Module:
        """Set this contender's kernels and memory format on the shared module (not timed)."""
        module = self.model()
        module.to(memory_format=torch.channels_last if self.fast_paths.channels_last else torch.contiguous_format)
        if self.family == "sdcore":
            # the heap policy is the whole process's, set once in main() for every contender
            self.runnable = dataclasses.replace(self.fast_paths, channels_last=False,
                                                keep_freed_memory=False).apply(module)
        else:
            self.runnable = module
        return self.runnable

    def step(self, data) -> None:
        self.runnable.zero_grad(set_to_none=True)
        train_step(self.runnable, self.fast_paths, *data)

    def release(self) -> None:
        """Free the gradients (and persistent-cast buffers) so the next contender has the memory."""
        self.model().zero_grad(set_to_none=True)
        self.runnable = None
        gc.collect()


def step_data(contender: Contender, batch: int, latent: int):
    data = inputs(batch, latent)
    if contender.fast_paths.channels_last:
        data[0] = data[0].contiguous(memory_format=torch.channels_last)
    return data


def count_flops(model, batch: int, latent: int) -> float:
    """Training FLOPs per sample (forward + backward) of a fp32 eager step."""
    counter = FlopCounterMode(display=False)
    with counter:
        train_step(model, FastPaths(), *inputs(batch, latent))
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


OP_CLASSES = {
    "mm": "matrix products", "addmm": "matrix products", "bmm": "matrix products", "baddbmm": "matrix products",
    "_linear_pointwise": "matrix products",  # oneDNN's GEMM (onednn_linear)
    "convolution": "convolutions, forward", "convolution_backward": "convolutions, backward",
    "_scaled_dot_product_flash_attention_for_cpu": "fused attention, forward",
    "_scaled_dot_product_flash_attention_for_cpu_backward": "fused attention, backward",
    "copy_": "casts and copies", "_to_copy": "casts and copies", "clone": "casts and copies",
    "im2col": "unfold/fold of GEMM convolutions", "col2im": "unfold/fold of GEMM convolutions",
}
# flop_counter has formulas for the CUDA flash attention only; the CPU kernels take the same leading shapes.
# It has none for oneDNN's GEMM: (tokens, in) x (out, in)^T.
OP_FLOPS = {
    **{packet.__name__: formula for packet, formula in flop_registry.items()},
    "_linear_pointwise": lambda x, weight, *args, out_val=None, **kwargs: 2 * x.numel() * weight.shape[0],
    "_scaled_dot_product_flash_attention_for_cpu": flop_registry[torch.ops.aten._scaled_dot_product_flash_attention],
    "_scaled_dot_product_flash_attention_for_cpu_backward":
        flop_registry[torch.ops.aten._scaled_dot_product_flash_attention_backward],
}


class OpTimer(TorchDispatchMode):
    """Wall time and FLOPs of every aten call under it: (seconds, op name, FLOPs, argument shapes)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[float, str, int, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        start = time.perf_counter()
        out = func(*args, **kwargs)
        seconds = time.perf_counter() - start
        name = func.overloadpacket.__name__
        flops = OP_FLOPS[name](*args, **kwargs, out_val=out) if name in OP_FLOPS else 0
        shapes = " ".join(f"{str(a.dtype).removeprefix('torch.')}{list(a.shape)}"
                          for a in args[:3] if isinstance(a, torch.Tensor))
        self.calls.append((seconds, name, flops, shapes))
        return out


def op_times(contender: Contender, batch: int, latent: int, peak_gflops: float, rows: int = 25) -> None:
    """Print where one step's time goes by operator class and shape, with each one's GFLOP/s."""
    contender.prepare()
    data = step_data(contender, batch, latent)
    for _ in range(2):  # warm-up: oneDNN's primitive caches, persistent casts, the heap
        contender.step(data)
    timer = OpTimer()
    start = time.perf_counter()
    with timer:
        contender.step(data)
    wall = time.perf_counter() - start
    contender.release()
    total = sum(call[0] for call in timer.calls)
    print(f"\none step of {contender.name}, operator by operator: {wall:.2f} s wall (with the timer's own "
          f"overhead), {total:.2f} s in {len(timer.calls)} aten calls; % of peak against the {contender.precision} "
          f"matmul peak {peak_gflops:.0f} GFLOP/s")

    def row(label: str, seconds: float, count: int, flops: int) -> str:
        rate = flops / seconds / 1e9
        cells = f" {flops / 1e9:.1f} | {rate:.0f} | {100 * rate / peak_gflops:.0f} |" if flops else " | | |"
        return f"| {label} | {count} | {1e3 * seconds:.1f} | {100 * seconds / total:.1f} |" + cells

    def table(title: str, key: Callable[[tuple], str], limit: int | None) -> list[str]:
        groups: dict[str, list] = {}
        for call in timer.calls:
            group = groups.setdefault(key(call), [0.0, 0, 0])
            group[0] += call[0]
            group[1] += 1
            group[2] += call[2]
        ranked = sorted(groups.items(), key=lambda kv: -kv[1][0])[:limit]
        return [f"\n| {title} | calls | ms | % of the step | GFLOP | GFLOP/s | % of peak |",
                "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"] + [row(label, *group) for label, group in ranked]

    other = "everything else (norms, activations, elementwise)"
    print("\n".join(table("operator class", lambda call: OP_CLASSES.get(call[1], other), None)))
    print(row("all", total, len(timer.calls), sum(call[2] for call in timer.calls)))
    print("\n".join(table("operator and argument shapes", lambda call: f"{call[1]} {call[3]}", rows)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="alternating repetitions; the best is kept")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per contender and repetition")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--only", nargs="+", help="run only the contenders whose names contain one of these")
    parser.add_argument("--op-times", metavar="NAME",
                        help="time one step of the contender whose name contains this operator by operator, then exit")
    parser.add_argument("--default-heap", action="store_true",
                        help="leave glibc's heap policy as it is (large blocks mapped fresh and page-faulted in "
                             "every step) instead of keep_freed_memory for the whole process")
    parser.add_argument("--compile", action="store_true",
                        help="add sdcore with train.fast_paths.compile (sdpa; bf16 where bf16 is fast); minutes")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    machine = MachineInfo.measure()
    machine.print()
    peaks = dict(fp32_gflops=machine.fp32_gflops, bf16_gflops=machine.bf16_gflops,
                 onednn_fp32_gflops=machine.onednn_fp32_gflops)
    recommended = recommend_fast_paths("fp32", **peaks)
    print(f"recommend_fast_paths('fp32') on this CPU: {recommended}")
    if recommended.keep_freed_memory and not args.default_heap and keep_freed_memory():
        print("heap: keep_freed_memory (the recommendation) set for the whole process, so every contender, "
              "diffusers' too, runs without the page faults of memory freed and taken again (--default-heap: glibc's default)")
    else:
        print("heap: glibc's default: blocks above its mmap threshold are mapped fresh and page-faulted in every step")

    models: dict[str, torch.nn.Module] = {}

    def shared(family: str) -> Callable[[], torch.nn.Module]:
        def get() -> torch.nn.Module:
            if family not in models:
                models[family] = build_sdcore() if family == "sdcore" else DiffusersAdapter(build_diffusers())
            return models[family]
        return get

    sdcore, diffusers = shared("sdcore"), shared("diffusers")
    contenders = [
        Contender("sdcore fp32 eager (math attention)", "sdcore", FastPaths(), sdcore),
        Contender("sdcore fp32 sdpa", "sdcore", FastPaths(attention="sdpa"), sdcore),
        Contender(f"sdcore fp32 recommended ({describe(recommended)})", "sdcore", recommended, sdcore),
    ]
    if recommended.attention == "onednn":  # the attention choice measured: the fused kernel instead
        contenders.append(Contender("sdcore fp32 recommended, sdpa attention", "sdcore",
                                    dataclasses.replace(recommended, attention="sdpa"), sdcore))
    if recommended.conv_winograd4_min_pixels:  # the F(4x4, 3x3) choice measured: F(2x2, 3x3) there instead
        contenders.append(Contender("sdcore fp32 recommended, Winograd F(2x2, 3x3) only", "sdcore",
                                    dataclasses.replace(recommended, conv_winograd4_min_pixels=0), sdcore))
    # the capability's Winograd thresholds measured: the other capability's instead
    other_capability = "AVX512" if torch.backends.cpu.get_cpu_capability() == "AVX2" else "AVX2"
    other = recommend_fast_paths("fp32", **peaks, capability=other_capability)
    if (other.conv_winograd_min_pixels, other.conv_winograd4_min_pixels) != (
            recommended.conv_winograd_min_pixels, recommended.conv_winograd4_min_pixels):
        contenders.append(Contender(
            f"sdcore fp32 recommended, {other_capability}'s Winograd maps ({describe(other)})", "sdcore",
            dataclasses.replace(recommended, conv_winograd_min_pixels=other.conv_winograd_min_pixels,
                                conv_winograd4_min_pixels=other.conv_winograd4_min_pixels), sdcore))
    if recommended.conv_winograd_min_pixels or recommended.conv_winograd4_min_pixels:
        # the Winograd choice measured: the same path on native convolutions
        contenders.append(Contender("sdcore fp32 recommended, native convolutions on the large maps", "sdcore",
                                    dataclasses.replace(recommended, conv_winograd_min_pixels=0,
                                                        conv_winograd4_min_pixels=0), sdcore))
    if not args.no_diffusers:
        contenders += [Contender("diffusers fp32", "diffusers", FastPaths(), diffusers),
                       Contender("diffusers fp32 + channels_last", "diffusers", FastPaths(channels_last=True),
                                 diffusers)]
    if machine.bf16_is_fast:
        fastest_bf16 = recommend_fast_paths("bf16", **peaks)
        contenders += [Contender("sdcore bf16 autocast", "sdcore", FastPaths(autocast="bf16"), sdcore),
                       Contender(f"sdcore bf16 recommended ({describe(fastest_bf16)})", "sdcore", fastest_bf16,
                                 sdcore)]
        if not args.no_diffusers:
            contenders.append(Contender("diffusers bf16 autocast", "diffusers", FastPaths(autocast="bf16"), diffusers))
    else:
        print("bf16 contenders skipped: bf16 matmul is not faster than fp32 on this CPU "
              f"({machine.bf16_gflops:.0f} vs {machine.fp32_gflops:.0f} GFLOP/s, AMX {'yes' if machine.amx else 'no'})")
    if args.compile:
        compiled = FastPaths(attention="sdpa", autocast="bf16" if machine.bf16_is_fast else None, compile=True)
        contenders.append(Contender(f"sdcore compile ({describe(compiled)})", "sdcore", compiled, sdcore))
    if args.only:
        contenders = [c for c in contenders if any(word in c.name for word in args.only)]

    if args.op_times:
        chosen = next(c for c in contenders if args.op_times in c.name)
        op_times(chosen, args.batch, args.latent, machine.peak_gflops(chosen.precision))
        return

    print(f"\ntraining step (forward + backward), batch {args.batch}, latent {args.latent}x{args.latent}, "
          f"context ({args.batch},{CONTEXT_LEN},{CONTEXT_DIM}); {args.repeats} alternating repetitions x "
          f"{args.steps} step(s), best kept; 1 untimed warm-up step per contender")
    flops = count_flops(sdcore(), args.batch, args.latent)
    print(f"  sdcore parameters {sum(p.numel() for p in sdcore().parameters()) / 1e6:.2f} M, training FLOPs "
          f"counted {flops / 1e12:.3f} TFLOP per sample")
    for repeat in range(args.repeats):
        for contender in contenders:
            contender.prepare()
            data = step_data(contender, args.batch, args.latent)
            if repeat == 0 or contender.fast_paths.persistent_weight_casts or contender.fast_paths.compile:
                contender.step(data)  # warm-up (persistent casts: refill the buffers dropped by release; compile)
            faults_before, start = minor_page_faults(), time.perf_counter()
            for _ in range(args.steps):
                contender.step(data)
            seconds = (time.perf_counter() - start) / args.steps
            faults = (minor_page_faults() - faults_before) // args.steps
            contender.best = min(contender.best, seconds)
            contender.times.append(seconds)
            contender.release()
            print(f"  repetition {repeat + 1}: {contender.name:<60s} {seconds:7.2f} s/step, "
                  f"{faults:9d} page faults/step", flush=True)

    print(f"\n| contender | s/step | samples/s | % of {'/'.join(sorted({c.precision for c in contenders}))} "
          f"matmul peak |")
    print("| --- | --- | --- | --- |")
    for c in contenders:
        rate = args.batch / c.best
        share = rate * flops / (machine.peak_gflops(c.precision) * 1e9)
        print(f"| {c.name} | {c.best:.2f} | {rate:.3f} | {100 * share:.1f} % ({c.precision}) |")
    by_name = {c.name: c for c in contenders}
    sdcore_fp32 = [c for c in contenders if c.name.startswith("sdcore fp32")]
    if "diffusers fp32" in by_name and sdcore_fp32:  # --only may leave a side out
        fastest_fp32 = min(sdcore_fp32, key=lambda c: c.best)
        diffusers_fp32_best = min(c.best for c in contenders if c.name.startswith("diffusers fp32"))
        print(f"\nsdcore's fastest faithful fp32 path / diffusers fp32: "
              f"{ratio_line(by_name['diffusers fp32'], fastest_fp32)} (goal >= {GOAL_VS_DIFFUSERS_FP32}x); "
              f"/ diffusers' fastest fp32 row: {diffusers_fp32_best / fastest_fp32.best:.2f}x")
        print(goal_line(by_name["diffusers fp32"].best / GOAL_VS_DIFFUSERS_FP32, fastest_fp32.best,
                        args.batch * flops, machine.peak_gflops("fp32"), "fp32"))
    if "diffusers bf16 autocast" in by_name and any(c.family == "sdcore" for c in contenders):
        fastest = min((c for c in contenders if c.family == "sdcore"), key=lambda c: c.best)
        print(f"sdcore's fastest path / diffusers bf16: {ratio_line(by_name['diffusers bf16 autocast'], fastest)} "
              f"(goal >= {GOAL_VS_DIFFUSERS_BF16}x where bf16 is fast)")
        print(goal_line(by_name["diffusers bf16 autocast"].best / GOAL_VS_DIFFUSERS_BF16, fastest.best,
                        args.batch * flops, machine.bf16_gflops, "bf16"))
    elif not machine.bf16_is_fast:
        print(f"goal >= {GOAL_VS_DIFFUSERS_BF16}x diffusers bf16: does not apply on this CPU (bf16 is slower than "
              "fp32 here, so no bf16 step is the fast one)")


def goal_line(goal_seconds: float, best_seconds: float, step_flops: float, peak_gflops: float, precision: str) -> str:
    """What a goal asks of the machine: the share of the matmul peak the step's FLOPs would run at."""
    def share(seconds: float) -> float:
        return 100 * step_flops / seconds / (peak_gflops * 1e9)
    return (f"  the goal is {goal_seconds:.2f} s/step: the step's FLOPs at {share(goal_seconds):.0f} % of the "
            f"{precision} matmul peak (the fastest path runs at {share(best_seconds):.0f} %)")


def minor_page_faults() -> int:
    """This process's minor page faults so far: each is the first touch of a 4 KB page the allocator
    took fresh from the kernel (glibc does so for a large allocation it cannot serve from memory
    freed earlier), a few microseconds of kernel time apiece."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def ratio_line(baseline: Contender, contender: Contender) -> str:
    """Speed-up of ``contender`` over ``baseline``: best against best, and per repetition (the pair run
    one after the other), median and range."""
    paired = sorted(b / c for b, c in zip(baseline.times, contender.times))
    return (f"{baseline.best / contender.best:.2f}x; per repetition median {statistics.median(paired):.2f}x, "
            f"{paired[0]:.2f}-{paired[-1]:.2f}x")


def describe(fast_paths: FastPaths) -> str:
    parts = [fast_paths.attention]
    if fast_paths.channels_last:
        parts.append("channels_last")
    if fast_paths.autocast:
        parts.append(fast_paths.autocast)
    if fast_paths.conv_gemm_max_pixels:
        parts.append(f"conv_gemm<={fast_paths.conv_gemm_max_pixels}")
    if fast_paths.conv_winograd_min_pixels:
        parts.append(f"winograd>={fast_paths.conv_winograd_min_pixels}")
    if fast_paths.conv_winograd4_min_pixels:
        parts.append(f"winograd4>={fast_paths.conv_winograd4_min_pixels}")
    if fast_paths.persistent_weight_casts:
        parts.append("persistent casts")
    if fast_paths.onednn_linear:
        parts.append("oneDNN linear")
    return " + ".join(parts)


if __name__ == "__main__":
    main()
