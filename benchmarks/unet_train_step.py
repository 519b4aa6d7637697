"""Benchmark (not a test): full-size SD2 UNet training step, sdcore vs diffusers, on this machine.

Times forward + backward (MSE to a fixed target, gradients of every parameter) at the MLPerf
UNet size for:
  * sdcore UNetModel, faithful fp32 eager and bf16 autocast;
  * sdcore sdpa attention + channels-last + bf16 autocast (and torch.compile on top with
    --compile);
  * sdcore's fastest faithful path: sdpa attention + bf16 autocast + convolutions on maps of at
    most 64 pixels as GEMMs + persistent weight casts (sdcore.conv, sdcore.precision);
  * diffusers' UNet2DConditionModel built at the SD2 architecture, fp32 and bf16 autocast
    (and bf16 + channels-last, so the memory-format gain is not credited to sdcore alone).
    diffusers cannot build the MLPerf 16-group GroupNorm of the residual blocks: it is built
    with 32 groups (same parameter count, same FLOPs to within a rounding).

Prints samples/s, FLOPs per sample (matmul/conv/attention FLOPs counted by
torch.utils.flop_counter during the fp32 warm-up; the shares of both models use sdcore's count,
since diffusers' attention runs the CPU flash kernel, which the counter does not know), and the share of the bf16 matmul peak measured
in this run (a large bf16 matmul), plus forward / backward seconds per sample at a 64x64
latent, batch 1. Needs the `bench` extra: pip install diffusers.

    python benchmarks/unet_train_step.py [--steps 3] [--warmup 1] [--compile] [--no-diffusers]
"""

import argparse
import contextlib
import dataclasses
import gc
import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from sdcore.precision import FastPaths
from sdcore.unet import UNetModel

SD2_UNET_PARAMS = {
    "use_checkpoint": False, "use_fp16": True, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "attention_resolutions": [4, 2, 1], "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "use_spatial_transformer": True,
    "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": 1024, "legacy": False,
}
CONTEXT_LEN, CONTEXT_DIM = 77, 1024


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


def matmul_peak(dtype: torch.dtype, n: int = 4096, reps: int = 3) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(reps):
        torch.mm(a, b)
    return 2 * n ** 3 * reps / (time.perf_counter() - start)


def time_train_steps(model, fast_paths: FastPaths, batch: int, latent: int, warmup: int, steps: int,
                     flop_counter: FlopCounterMode | None = None) -> float:
    """Seconds per training step (mean over `steps` after `warmup`); the warm-up steps run
    inside `flop_counter` when one is given."""
    data = inputs(batch, latent)
    if fast_paths.channels_last:
        data[0] = data[0].contiguous(memory_format=torch.channels_last)

    def step():
        model.zero_grad(set_to_none=fast_paths.grads_set_to_none)
        train_step(model, fast_paths, *data)

    with flop_counter if flop_counter is not None else contextlib.nullcontext():
        for _ in range(warmup):
            step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    elapsed = (time.perf_counter() - start) / steps
    model.zero_grad(set_to_none=True)
    return elapsed


def time_forward_backward(model, fast_paths: FastPaths, latent: int, warmup: int, steps: int):
    """Seconds per sample of forward and of backward at batch 1."""
    x, t, context, target = inputs(1, latent)
    if fast_paths.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    fwd = bwd = 0.0
    for i in range(warmup + steps):
        model.zero_grad(set_to_none=fast_paths.grads_set_to_none)
        start = time.perf_counter()
        with fast_paths.autocast_context("cpu"):
            out = model(x, t, context)
        loss = torch.nn.functional.mse_loss(out.float(), target)
        mid = time.perf_counter()
        loss.backward()
        end = time.perf_counter()
        if i >= warmup:
            fwd += mid - start
            bwd += end - mid
    model.zero_grad(set_to_none=True)
    return fwd / steps, bwd / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--big-latent", type=int, default=64, help="latent size of the fwd/bwd per-sample timing")
    parser.add_argument("--warmup", type=int, default=1, help="at least 1 (FLOPs are counted there)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--big-warmup", type=int, default=0,
                        help="warm-up passes at the big latent (one-time costs are small beside a pass there)")
    parser.add_argument("--big-steps", type=int, default=1)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--compile", action="store_true", help="also time the fastest path under torch.compile")
    parser.add_argument("--no-diffusers", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    peak_bf16 = matmul_peak(torch.bfloat16)
    peak_fp32 = matmul_peak(torch.float32)
    print(f"measured matmul peak (4096^3): bf16 {peak_bf16 / 1e9:.1f} GFLOP/s, fp32 {peak_fp32 / 1e9:.1f} GFLOP/s")

    fp32 = FastPaths()
    bf16 = FastPaths(autocast="bf16")
    sdpa_cl = FastPaths(attention="sdpa", channels_last=True, autocast="bf16")
    fastest = FastPaths(attention="sdpa", autocast="bf16", conv_gemm_max_pixels=64, persistent_weight_casts=True)
    fastest_name = "sdcore sdpa + bf16 + conv_gemm<=64 + persistent casts"
    rows, flops = [], {}

    def record(name, fast_paths, model, count_flops=False):
        counter = FlopCounterMode(display=False) if count_flops else None
        seconds = time_train_steps(model, fast_paths, args.batch, args.latent, args.warmup, args.steps, counter)
        if counter is not None:
            print(f"  training FLOPs per sample counted: "
                  f"{counter.get_total_flops() / (args.batch * args.warmup) / 1e12:.3f} TFLOP")
            flops.setdefault("sdcore", counter.get_total_flops() / (args.batch * args.warmup))
        rate = args.batch / seconds
        share = rate * flops["sdcore"] / peak_bf16
        rows.append((name, rate, share))
        print(f"  {name:<54s} {seconds:8.2f} s/step {rate:7.3f} samples/s {100 * share:5.1f}% of bf16 peak",
              flush=True)

    print(f"\ntraining step, batch {args.batch}, latent {args.latent}x{args.latent}, context "
          f"({args.batch},{CONTEXT_LEN},{CONTEXT_DIM}), {args.warmup} warm-up + {args.steps} timed steps")
    model = build_sdcore()
    print(f"  sdcore parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")
    record("sdcore fp32 eager (math attention)", fp32, model, count_flops=True)
    record("sdcore bf16 autocast (math attention)", bf16, model)
    big = {}
    for name, fast_paths in (("fp32", fp32), ("bf16", bf16)):
        big[name] = time_forward_backward(model, fast_paths, args.big_latent, args.big_warmup,
                                          args.big_steps)
    record("sdcore sdpa + channels_last + bf16", sdpa_cl, sdpa_cl.apply(model))
    if args.compile:
        compiled = dataclasses.replace(sdpa_cl, compile=True)
        record("sdcore sdpa + channels_last + bf16 + compile", compiled, compiled.apply(model))
    model = model.to(memory_format=torch.contiguous_format)
    runnable = fastest.apply(model)
    record(fastest_name, fastest, runnable)
    big["sdpa+bf16+conv_gemm<=64+persistent casts"] = time_forward_backward(
        runnable, fastest, args.big_latent, args.big_warmup, args.big_steps)
    del model, runnable
    gc.collect()

    if not args.no_diffusers:
        model = DiffusersAdapter(build_diffusers())
        print(f"  diffusers parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
              f"(GroupNorm 32 everywhere)")
        record("diffusers fp32", fp32, model, count_flops=True)
        record("diffusers bf16 autocast", bf16, model)
        diffusers_cl = FastPaths(channels_last=True, autocast="bf16")
        record("diffusers bf16 autocast + channels_last", diffusers_cl, diffusers_cl.apply(model))
        del model
        gc.collect()
        rates = {name: rate for name, rate, _ in rows}
        best_diffusers = max(rate for name, rate, _ in rows if name.startswith("diffusers"))
        print(f"\nsdcore fastest faithful path / diffusers bf16: "
              f"{rates[fastest_name] / rates['diffusers bf16 autocast']:.2f}x (goal >= 1.3x); "
              f"/ diffusers' fastest row: {rates[fastest_name] / best_diffusers:.2f}x")

    print(f"\nforward / backward seconds per sample, sdcore, latent {args.big_latent}x{args.big_latent}, batch 1:")
    for name, (fwd, bwd) in big.items():
        print(f"  {name:<40s} forward {fwd:7.2f} s  backward {bwd:7.2f} s")


if __name__ == "__main__":
    main()
