"""Benchmark (not a test): per-image time of the evaluation pipeline (sdcore.evaluate.Evaluator), by stage,
and sdcore's DDIM + decode beside diffusers' StableDiffusionPipeline loop on the same weights.

Two scales, each with random weights built from a config (nothing is downloaded):

* demo: the demo config's tiny models (config.yaml merged with profiles/demo/demo-config.yaml:
  32-channel UNet at an 8x8 latent, tiny VAE to 64x64 images, sdcore-tiny-clip), 50 DDIM steps;
* full: the real benchmark's models (865.9 M UNet at a 64x64 latent, SD2 VAE to 512x512, OpenCLIP
  ViT-H-14 text encoder and CLIP scorer). A 50-step image costs ~15 minutes on 2 CPU cores, so
  the full scale runs ``--full-steps`` DDIM steps (default 2) and the DDIM time is extrapolated
  linearly to 50 steps (each step is the same guided batch-2 forward), in the stage table and in the
  comparison with diffusers (where each side's decode is timed apart); said beside the figures.

The evaluation runs through ``Evaluator.score_prompts`` (the product's path: text encoder, guided
DDIM, VAE decode, Inception features, CLIP score) with each stage timed by a wrapper, at the eval
precision the CPU favours (fp32 unless bf16 matmul is faster here). Goal: no stage other than the
UNet above 15 % of the time.

The diffusers side: our UNet and VAE state dicts converted with diffusers' own single-file
utilities (``convert_ldm_unet_checkpoint``, ``convert_ldm_vae_checkpoint`` with the configs made
by ``create_*_diffusers_config_from_ldm`` from our config), the residual-block GroupNorms set to
the MLPerf 16 groups (diffusers builds one group count for all), then the loop of
``StableDiffusionPipeline`` (DDIMScheduler of SD2: scaled_linear, v_prediction, steps_offset 1,
guidance on a batch of uncond + cond, ``vae.decode(latents / scaling_factor)``). Before timing,
both sides' images for the same latents and contexts must agree (max abs difference printed,
required below 1e-3). The sdcore rows: the faithful path, sdpa attention, sdpa with the linear
layers and the 8x8-map convolutions on oneDNN's GEMM (``eval.fast_paths.onednn_linear`` and
``conv_gemm_max_pixels: 64``), those with the attention's products on oneDNN's GEMM as well and the
16x16 and larger maps' 3x3 convolutions as Winograd F(2x2, 3x3) and F(4x4, 3x3)
(``attention: onednn``, ``conv_winograd_min_pixels: 256``, ``conv_winograd4_min_pixels: 1024``;
each layer's filter tiles are kept over the sampling), and sdpa with the UNet compiled (``eval.fast_paths.compile``; its
compilation is done once before the timing and its time printed). Goal: sdcore >= 1.3x diffusers
on the same work.

The heap policy is the whole process's: ``keep_freed_memory`` (``eval.fast_paths.keep_freed_memory``)
is set once at the start, so every row, diffusers' too, runs without re-faulting the memory each
guided step frees; ``--default-heap`` keeps glibc's default.

    python benchmarks/evaluation.py [--scale demo full] [--prompts 12] [--full-steps 2] [--repeats 2] [--default-heap]
"""

from __future__ import annotations

import argparse
import copy
import contextlib
import gc
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from machine import REPO, MachineInfo  # benchmarks/machine.py; also puts the repository on sys.path

import numpy as np
import torch
import yaml

from sdcore.diffusion import ddim_sample
from sdcore.evaluate import EvalFastPaths, EvalInputs, Evaluator, initial_latents, sampling_kernels, to_unit_images
from sdcore.precision import keep_freed_memory
from sdcore.fid import save_stats
from sdcore.unet import UNetModel

GOAL_VS_DIFFUSERS = 1.3
GOAL_OTHER_STAGE_SHARE = 0.15
FULL_DDIM_STEPS = 50
AGREEMENT_ATOL = 1e-3
# The linear layers and the 8x8-map convolutions on oneDNN's GEMM.
GEMM_FP32_KERNELS = {"onednn_linear": True, "conv_gemm_max_pixels": 64}
# On top of the GEMM kernels: attention's products and Winograd convolutions of the 16x16 and larger
# maps on oneDNN's GEMM too (fp32), each layer's filter tiles kept over the sampling.
FASTEST_FP32_KERNELS = {"attention": "onednn", "conv_winograd_min_pixels": 256, "conv_winograd4_min_pixels": 1024}


def paths_text(paths: dict) -> str:
    return "{" + ", ".join(f"{key}: {str(value).lower()}" for key, value in paths.items()) + "}"


def deep_merge(base: dict, override: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else copy.deepcopy(value)
    return merged


def load_config(scale: str) -> dict:
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    if scale == "demo":
        config = deep_merge(config, yaml.safe_load((REPO / "profiles" / "demo" / "demo-config.yaml").read_text()))
    return config


class Stages:
    """Seconds per stage, from wrappers around the evaluator's parts."""

    def __init__(self):
        self.seconds = defaultdict(float)

    @contextlib.contextmanager
    def timing(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] += time.perf_counter() - start

    def wrap(self, stage: str, fn):
        def timed(*args, **kwargs):
            with self.timing(stage):
                return fn(*args, **kwargs)
        return timed


class TimedUNet(torch.nn.Module):
    def __init__(self, unet, stages: Stages):
        super().__init__()
        self.unet, self.stages = unet, stages

    def forward(self, *args):
        with self.stages.timing("UNet (guided DDIM)"):
            return self.unet(*args)


def randomize_zero_init(module: torch.nn.Module, seed: int = 0) -> None:
    """Random values for the zero-initialised layers (a fresh UNet's output is exactly 0 otherwise,
    which would make the agreement check with diffusers vacuous)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def write_inputs(config: dict, root: Path, num_prompts: int) -> tuple[EvalInputs, dict]:
    """Random-weight files of the evaluation (SD checkpoint, Inception, CLIP, prompts, statistics) and the
    SD checkpoint's state dict (the UNet's weights are its model.diffusion_model.*)."""
    import open_clip
    from safetensors.torch import save_file

    import sdcore.text_encoder  # noqa: F401  registers sdcore-tiny-clip
    from sdcore.autoencoder import AutoencoderKL
    from sdcore.fid import InceptionV3Features

    torch.manual_seed(0)
    params = config["model"]["params"]
    unet = UNetModel(**params["unet_config"]["params"])
    randomize_zero_init(unet)
    vae_params = params["first_stage_config"]["params"]
    vae = AutoencoderKL(vae_params["ddconfig"], vae_params["embed_dim"])
    text_arch = params["cond_stage_config"]["params"]["arch"]
    clip = open_clip.create_model(config["checkpoints"]["clip"]["arch"], pretrained=None)
    text = clip if config["checkpoints"]["clip"]["arch"] == text_arch else open_clip.create_model(text_arch)
    state = {f"model.diffusion_model.{k}": v for k, v in unet.state_dict().items()}
    state.update({f"first_stage_model.{k}": v for k, v in vae.state_dict().items()})
    state.update({f"cond_stage_model.model.{k}": v for k, v in text.state_dict().items() if not k.startswith("visual.")})
    inputs = EvalInputs(prompts=root / "prompts.tsv", fid_stats=root / "stats.npz", inception=root / "inception.pth",
                        clip=root / "clip.safetensors", sd_checkpoint=root / "sd.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, str(inputs.sd_checkpoint))
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(inputs.clip))
    torch.save(InceptionV3Features(None).state_dict(), inputs.inception)
    del clip, text, vae
    words = ["a", "red", "bus", "dog", "on", "the", "street", "bowl", "of", "fruit", "two", "cats", "snow"]
    rng = np.random.default_rng(0)
    rows = ["image_id\tid\tcaption"] + [f"{i}\t{i}\t{' '.join(rng.choice(words, 8))}" for i in range(num_prompts)]
    inputs.prompts.write_text("\n".join(rows) + "\n")
    features = rng.standard_normal((64, 2048))
    save_stats(inputs.fid_stats, features.mean(0), np.cov(features, rowvar=False) + np.eye(2048))
    return inputs, state


def run_evaluator(config: dict, inputs: EvalInputs, unet, num_prompts: int, stages: Stages) -> float:
    """Seconds of Evaluator.score_prompts over ``num_prompts`` prompts (one batch), per-stage times in ``stages``."""
    evaluator = Evaluator(config, inputs, "cpu")
    gen = evaluator.generator
    gen.text_encoder.encode = stages.wrap("text encoder", gen.text_encoder.encode)
    gen.vae.decode_latents = stages.wrap("VAE decode", gen.vae.decode_latents)
    evaluator.inception = stages.wrap("Inception features", evaluator.inception)
    evaluator.clip.score = stages.wrap("CLIP score", evaluator.clip.score)
    start = time.perf_counter()
    evaluator.score_prompts(TimedUNet(unet, stages), range(num_prompts), seed=0, batch_size=num_prompts)
    total = time.perf_counter() - start
    del evaluator
    gc.collect()
    return total


# ---- diffusers ----------------------------------------------------------------------------------

def diffusers_models(config: dict, state: dict):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
                                                     create_unet_diffusers_config_from_ldm,
                                                     create_vae_diffusers_config_from_ldm)
    from diffusers.models.resnet import ResnetBlock2D

    original = {"model": {"params": config["model"]["params"]}}
    unet_config = create_unet_diffusers_config_from_ldm(original, state)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(convert_ldm_unet_checkpoint(state, unet_config), strict=True)
    for module in unet.modules():  # the MLPerf 16-group GroupNorm of the residual blocks and the output head
        if isinstance(module, ResnetBlock2D):
            module.norm1.num_groups = module.norm2.num_groups = 16
    unet.conv_norm_out.num_groups = 16
    vae_config = create_vae_diffusers_config_from_ldm(original, state)
    vae_config["scaling_factor"] = config["model"]["params"]["scale_factor"]
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(convert_ldm_vae_checkpoint(state, vae_config), strict=True)
    return unet.eval().requires_grad_(False), vae.eval().requires_grad_(False)


def diffusers_scheduler(config: dict):
    from diffusers import DDIMScheduler

    p = config["model"]["params"]
    # Stable Diffusion 2's scheduler_config.json
    return DDIMScheduler(num_train_timesteps=p["timesteps"], beta_start=p["linear_start"], beta_end=p["linear_end"],
                         beta_schedule="scaled_linear", prediction_type="v_prediction", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


@torch.no_grad()
def diffusers_generate(unet, vae, scheduler, x_T, cond, uncond, steps: int, guidance: float,
                       stages: Stages | None = None) -> torch.Tensor:
    """StableDiffusionPipeline.__call__'s denoising loop and decode (eta 0, classifier-free guidance); the
    decode's seconds go to ``stages``."""
    scheduler.set_timesteps(steps)
    latents = x_T * scheduler.init_noise_sigma
    context = torch.cat([uncond, cond])
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        noise_pred = unet(model_input, t, encoder_hidden_states=context, return_dict=False)[0]
        uncond_pred, cond_pred = noise_pred.chunk(2)
        noise_pred = uncond_pred + guidance * (cond_pred - uncond_pred)
        latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
    with stages.timing("decode") if stages else contextlib.nullcontext():
        images = vae.decode(latents / vae.config.scaling_factor, return_dict=False)[0]
    return to_unit_images(images)


@torch.no_grad()
def sdcore_generate(unet, vae, schedule, x_T, cond, uncond, steps: int, guidance: float,
                    stages: Stages | None = None) -> torch.Tensor:
    """ImageGenerator.generate's DDIM and decode (fp32); the decode's seconds go to ``stages``."""
    z = ddim_sample(lambda x, t, c: unet(x, t, c).float(), x_T, cond, uncond, schedule, steps=steps,
                    guidance_scale=guidance)
    with stages.timing("decode") if stages else contextlib.nullcontext():
        return to_unit_images(vae.decode_latents(z))


def compare_with_diffusers(config: dict, inputs: EvalInputs, state: dict, unet, num_prompts: int, steps: int,
                           repeats: int) -> dict:
    from sdcore.checkpoint import StableDiffusionCheckpoint
    from sdcore.diffusion import LinearSchedule

    p = config["model"]["params"]
    sd = StableDiffusionCheckpoint(inputs.sd_checkpoint)
    vae = sd.vae(p["first_stage_config"]["params"], p["scale_factor"])
    encoder = sd.text_encoder(p["cond_stage_config"]["params"])
    del sd
    prompts = [f"prompt {i} of the comparison" for i in range(num_prompts)]
    cond, uncond = encoder.encode(prompts), encoder.encode([""]).expand(num_prompts, -1, -1)
    del encoder
    x_T = initial_latents(range(num_prompts), (p["channels"], p["image_size"], p["image_size"]), seed=0)
    schedule = LinearSchedule(p["linear_start"], p["linear_end"], p["timesteps"])
    d_unet, d_vae = diffusers_models(config, state)
    scheduler = diffusers_scheduler(config)
    guidance = float(config["eval"]["guidance_scale"])
    ours = sdcore_generate(unet, vae, schedule, x_T, cond, uncond, steps, guidance)
    theirs = diffusers_generate(d_unet, d_vae, scheduler, x_T, cond, uncond, steps, guidance)
    difference = (ours - theirs).abs().max().item()
    del ours, theirs
    print(f"  agreement: sdcore vs diffusers images, {steps} DDIM steps, max abs difference {difference:.2e} "
          f"(required < {AGREEMENT_ATOL:g}; pixel range [0, 1])")
    if not difference < AGREEMENT_ATOL:
        raise SystemExit("sdcore and diffusers disagree: the conversion or the sampler differs; not timing")

    def sdcore_with(stages=None, **paths):
        with sampling_kernels(unet, EvalFastPaths(**paths)):
            return sdcore_generate(unet, vae, schedule, x_T, cond, uncond, steps, guidance, stages)

    compiled = torch.compile(unet)

    def sdcore_compiled(stages=None):
        with sampling_kernels(unet, EvalFastPaths(attention="sdpa")):
            return sdcore_generate(compiled, vae, schedule, x_T, cond, uncond, steps, guidance, stages)

    start = time.perf_counter()
    eager_sdpa = sdcore_with(attention="sdpa")
    difference = (sdcore_compiled() - eager_sdpa).abs().max().item()
    print(f"  eval.fast_paths.compile: compiled and ran once in {time.perf_counter() - start:.0f} s (not timed "
          f"below); images within {difference:.1e} of eager sdpa")
    gemm_kernels = {"attention": "sdpa", **GEMM_FP32_KERNELS}
    difference = (sdcore_with(**gemm_kernels) - eager_sdpa).abs().max().item()
    print(f"  eval.fast_paths {{onednn_linear: true, conv_gemm_max_pixels: 64}}: images within {difference:.1e} "
          f"of eager sdpa")
    fastest = {**gemm_kernels, **FASTEST_FP32_KERNELS}
    difference = (sdcore_with(**fastest) - eager_sdpa).abs().max().item()
    print(f"  eval.fast_paths {paths_text(fastest)}: images within {difference:.1e} of eager sdpa")
    del eager_sdpa
    contenders = {"sdcore faithful (math attention)": lambda stages: sdcore_with(stages, attention="math"),
                  "sdcore eval.fast_paths.attention sdpa": lambda stages: sdcore_with(stages, attention="sdpa"),
                  "sdcore eval.fast_paths {attention: sdpa, onednn_linear: true, conv_gemm_max_pixels: 64}":
                      lambda stages: sdcore_with(stages, **gemm_kernels),
                  f"sdcore eval.fast_paths {paths_text(fastest)}": lambda stages: sdcore_with(stages, **fastest),
                  "sdcore eval.fast_paths {attention: sdpa, compile: true}": sdcore_compiled,
                  "diffusers": lambda stages: diffusers_generate(d_unet, d_vae, scheduler, x_T, cond, uncond, steps,
                                                                 guidance, stages)}
    best = {name: (float("inf"), 0.0) for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            stages = Stages()
            start = time.perf_counter()
            fn(stages)
            seconds, decode = time.perf_counter() - start, stages.seconds["decode"]
            best[name] = min(best[name], (decode + (seconds - decode) * FULL_DDIM_STEPS / steps, decode))
    contenders.clear()
    gc.collect()
    return best


def report(scale: str, config: dict, num_prompts: int, steps: int, stages: Stages | None, total: float,
           versus: dict | None) -> None:
    if stages is None:
        return report_versus(num_prompts, steps, versus)
    factor = FULL_DDIM_STEPS / steps
    per_image = {stage: s / num_prompts * (factor if stage.startswith("UNet") else 1.0)
                 for stage, s in stages.seconds.items()}
    other = max(total - sum(stages.seconds.values()), 0.0) / num_prompts
    per_image["other (latents, DDIM arithmetic, uint8, PIL)"] = other
    whole = sum(per_image.values())
    note = "" if steps == FULL_DDIM_STEPS else f" (UNet measured over {steps} DDIM steps, extrapolated to 50)"
    print(f"\n{scale} scale: {num_prompts} prompts in one batch, eval precision "
          f"{config['eval']['precision']}{note}")
    print("| stage | s/image | share | goal |")
    print("| --- | --- | --- | --- |")
    for stage, seconds in per_image.items():
        share = seconds / whole
        goal = "" if stage.startswith("UNet") else ("meets" if share <= GOAL_OTHER_STAGE_SHARE else "MISSES") + \
            f" (<= {GOAL_OTHER_STAGE_SHARE:.0%})"
        print(f"| {stage} | {seconds:.4f} | {share:.1%} | {goal} |")
    print(f"| total per image (50 DDIM steps) | {whole:.3f} | 100 % | |")


def report_versus(num_prompts: int, steps: int, versus: dict | None) -> None:
    if versus:
        note = "" if steps == FULL_DDIM_STEPS else \
            f" (DDIM measured over {steps} steps and extrapolated to {FULL_DDIM_STEPS}, decode as measured)"
        print(f"\nDDIM ({FULL_DDIM_STEPS} steps) + decode of {num_prompts} images, same weights, fp32, best of the "
              f"repetitions{note}:")
        print("| implementation | s | s/image | of which decode | speed-up |")
        print("| --- | --- | --- | --- | --- |")
        baseline = versus["diffusers"][0]
        for name, (seconds, decode) in versus.items():
            print(f"| {name} | {seconds:.2f} | {seconds / num_prompts:.3f} | {decode:.2f} | {baseline / seconds:.2f}x |")
        for name in (n for n in versus if n.startswith("sdcore")):
            ratio = baseline / versus[name][0]
            print(f"{name} / diffusers: {ratio:.2f}x (goal >= {GOAL_VS_DIFFUSERS}x: "
                  f"{'meets' if ratio >= GOAL_VS_DIFFUSERS else 'MISSES'})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", nargs="+", default=["demo", "full"], choices=["demo", "full"])
    parser.add_argument("--prompts", type=int, default=12, help="demo-scale prompts (one batch, the demo's eval batch)")
    parser.add_argument("--full-prompts", type=int, default=1)
    parser.add_argument("--full-steps", type=int, default=2, help="DDIM steps at full scale (extrapolated to 50)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument("--default-heap", action="store_true",
                        help="leave glibc's heap policy as it is instead of keep_freed_memory for the whole process")
    args = parser.parse_args()
    machine = MachineInfo.measure()
    machine.print()
    if not args.default_heap and keep_freed_memory():
        print("heap: keep_freed_memory (eval.fast_paths.keep_freed_memory) set for the whole process, so every "
              "contender, diffusers' too, runs without the page faults of memory freed and taken again")
    else:
        print("heap: glibc's default")
    torch.set_grad_enabled(False)
    for scale in args.scale:
        config = load_config(scale)
        config["eval"]["precision"] = machine.best_precision
        prompts = args.prompts if scale == "demo" else args.full_prompts
        steps = FULL_DDIM_STEPS if scale == "demo" else args.full_steps
        config["eval"]["ddim_steps"] = steps
        config["eval"]["num_prompts"] = prompts
        with tempfile.TemporaryDirectory(prefix=f"sdcore-eval-{scale}-") as tmp:
            started = time.perf_counter()
            inputs, state = write_inputs(config, Path(tmp), prompts)
            unet = UNetModel(**config["model"]["params"]["unet_config"]["params"])
            unet.load_state_dict({k.removeprefix("model.diffusion_model."): v for k, v in state.items()
                                  if k.startswith("model.diffusion_model.")})
            unet.eval().requires_grad_(False)
            print(f"\n{scale}: random-weight models built and written in {time.perf_counter() - started:.0f} s")
            variants = {"faithful (eval.fast_paths unset)": {},
                        "eval.fast_paths {attention: sdpa, fast_inception: true}":
                            {"attention": "sdpa", "fast_inception": True},
                        "eval.fast_paths {attention: sdpa, onednn_linear: true, conv_gemm_max_pixels: 64, "
                        "fast_inception: true}":
                            {"attention": "sdpa", **GEMM_FP32_KERNELS, "fast_inception": True}}
            fastest = {**GEMM_FP32_KERNELS, **FASTEST_FP32_KERNELS, "fast_inception": True}
            if config["eval"]["precision"] == "fp32":  # oneDNN's products take fp32 calls only
                variants[f"eval.fast_paths {paths_text(fastest)}"] = fastest
            best = {name: (float("inf"), None) for name in variants}
            for _ in range(args.repeats if scale == "demo" else 1):
                for name, fast_paths in variants.items():
                    stages = Stages()
                    total = run_evaluator({**config, "eval": {**config["eval"], "fast_paths": fast_paths}}, inputs,
                                          unet, prompts, stages)
                    if total < best[name][0]:
                        best[name] = (total, stages)
            versus = None
            if not args.no_diffusers:
                versus = compare_with_diffusers(config, inputs, state, unet, prompts, steps,
                                                args.repeats if scale == "demo" else 1)
            for name, (total, stages) in best.items():
                report(f"{scale}, {name}", config, prompts, steps, stages, total, None)
            report(scale, config, prompts, steps, None, 0.0, versus)
            del unet, state
            gc.collect()


if __name__ == "__main__":
    main()
