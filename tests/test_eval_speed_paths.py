"""Speed paths of the evaluation (``eval.fast_paths``, sdcore.evaluate.EvalFastPaths) against the faithful path.

Tolerances, each stated with why:
* sdpa attention while sampling: a fused kernel that sums q k^T and the softmax in another order; after 10
  guided DDIM steps the float images agree to IMAGE_ATOL (of the [0, 1] range), a uint8 level is 1/255;
* linear layers and the 8x8-map convolutions on oneDNN's GEMM while sampling: the same products summed in
  another order; after 10 guided DDIM steps the images agree to IMAGE_ATOL;
* fast Inception (BatchNorm folded into the convolutions, channels-last): the same affine maps rounded once
  fewer; the pool3 features agree to FEATURE_RTOL of their largest value;
* torch.compile of the UNet while sampling (pytest -m compile): inductor fuses and reorders the float
  arithmetic; after 10 guided DDIM steps the images agree to IMAGE_ATOL;
* the whole evaluation with every speed path: FID within FID_RTOL relative and CLIP within CLIP_ATOL of the
  faithful evaluation (the images may move by a uint8 level in a few pixels, as in tests/test_evaluate.py).
Tiny models throughout (the golden UNet and VAE, sdcore-tiny-clip, a calibrated random Inception), one thread.
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from prep_helpers import TINY_CLIP_ARCH, golden_unet_state, tiny_clip_weights, tiny_model_params, tiny_sd_checkpoint
import sdcore.attention
import sdcore.conv
import sdcore.evaluate
from sdcore.attention import CrossAttention, set_attention_backend
from sdcore.conv import Conv2d, set_conv_gemm
from sdcore.evaluate import EvalFastPaths, EvalInputs, Evaluator, ImageGenerator, initial_latents, sampling_kernels
from sdcore.linear import Linear
from sdcore.fid import InceptionV3Features, gaussian_stats
from sdcore.unet import UNetModel
from sdcore.winograd import conv2d_winograd

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workflow_scripts"))
from demo_mirror import inception_state  # noqa: E402
from test_linear import _AtenOps  # noqa: E402
from test_winograd import counting_filter_transforms  # noqa: E402

IMAGE_ATOL = 1e-4
FEATURE_RTOL = 1e-5
FID_RTOL = 1e-3
CLIP_ATOL = 1e-4
DDIM_STEPS = 10
PROMPTS = ["a red circle on a blue square", "two green triangles", "a cat on a sofa", "a yellow bus in the rain"]


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def config(fast_paths=None) -> dict:
    cfg = {"model": {"params": tiny_model_params()}, "checkpoints": {"clip": {"arch": TINY_CLIP_ARCH}},
           "eval": {"num_prompts": len(PROMPTS), "batch_size": 2, "precision": "fp32", "ddim_steps": DDIM_STEPS,
                    "eta": 0.0, "guidance_scale": 8.0, "fid_target": 90.0, "clip_target": 0.15, "sample_grid": 0}}
    if fast_paths is not None:
        cfg["eval"]["fast_paths"] = fast_paths
    return cfg


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval_speed")
    rows = [f"{1000 + i}\t{i}\t{caption}" for i, caption in enumerate(PROMPTS)]
    (root / "prompts.tsv").write_text("image_id\tid\tcaption\n" + "\n".join(rows) + "\n")
    files = EvalInputs(prompts=root / "prompts.tsv", fid_stats=root / "stats.npz", inception=root / "inception.pth",
                       clip=tiny_clip_weights(root / "clip.bin"), sd_checkpoint=tiny_sd_checkpoint(root / "sd.ckpt"))
    generator = ImageGenerator(config()["model"]["params"], files.sd_checkpoint, "cpu", ddim_steps=DDIM_STEPS)
    coco = generator.generate(unet(), ["a dog on a lawn"] * 6, initial_latents(range(6), generator.latent_shape, 7))
    torch.save(inception_state(coco[:4], seed=0), files.inception)
    mu, sigma = gaussian_stats(InceptionV3Features(files.inception)(coco))
    np.savez_compressed(files.fid_stats, mu=mu, sigma=sigma)
    return files


def unet() -> UNetModel:
    model = UNetModel(**tiny_model_params()["unet_config"]["params"])
    model.load_state_dict(golden_unet_state(), strict=True)
    return model.eval().requires_grad_(False)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sdpa", "onednn"])
def test_fast_attention_sampling_gives_the_images_of_math_attention_and_restores_the_unet(inputs, monkeypatch,
                                                                                          backend):
    """sdpa, and onednn with its query threshold lowered to the tiny UNet's 64 latent tokens."""
    monkeypatch.setattr(sdcore.attention, "ONEDNN_ATTENTION_MIN_QUERIES", 1)
    faithful = ImageGenerator(config()["model"]["params"], inputs.sd_checkpoint, "cpu", ddim_steps=DDIM_STEPS)
    fast = ImageGenerator(config()["model"]["params"], inputs.sd_checkpoint, "cpu", ddim_steps=DDIM_STEPS,
                          fast_paths={"attention": backend})
    model = unet()
    x_T = initial_latents(range(len(PROMPTS)), faithful.latent_shape, 0)
    reference = faithful.generate(model, PROMPTS, x_T)
    images = fast.generate(model, PROMPTS, x_T)
    assert (images - reference).abs().max().item() <= IMAGE_ATOL
    assert not torch.equal(images, reference)  # the other kernel did run
    assert {m.attention_backend for m in model.modules() if isinstance(m, CrossAttention)} == {"math"}


def kernel_settings(model) -> tuple[set, set, set]:
    """Every module's kernel switches: attention backends, Linear.onednn, the GEMM and Winograd convolutions'."""
    return ({m.attention_backend for m in model.modules() if isinstance(m, CrossAttention)},
            {m.onednn for m in model.modules() if isinstance(m, Linear)},
            {(m.gemm_max_pixels, m.winograd_min_pixels, m.winograd4_min_pixels, m.gemm_onednn)
             for m in model.modules() if isinstance(m, Conv2d)})


def test_gemm_kernel_sampling_gives_the_images_of_the_native_kernels(inputs):
    """eval.fast_paths.onednn_linear and conv_gemm_max_pixels: 64 (the tiny UNet's 8x8 latent) beside sdpa alone."""
    params = config()["model"]["params"]
    native = ImageGenerator(params, inputs.sd_checkpoint, "cpu", ddim_steps=DDIM_STEPS, fast_paths={"attention": "sdpa"})
    gemm = ImageGenerator(params, inputs.sd_checkpoint, "cpu", ddim_steps=DDIM_STEPS,
                          fast_paths={"attention": "sdpa", "onednn_linear": True, "conv_gemm_max_pixels": 64})
    model = unet()
    x_T = initial_latents(range(len(PROMPTS)), native.latent_shape, 0)
    with _AtenOps() as native_ops:
        reference = native.generate(model, PROMPTS, x_T)
    with _AtenOps() as gemm_ops:
        images = gemm.generate(model, PROMPTS, x_T)
    assert (images - reference).abs().max().item() <= IMAGE_ATOL
    assert {"_linear_pointwise", "im2col"} <= gemm_ops.names - native_ops.names  # the GEMM kernels did run
    assert kernel_settings(model) == ({"math"}, {False}, {(0, 0, 0, False)})


@pytest.mark.parametrize("key, m", [("conv_winograd_min_pixels", 2), ("conv_winograd4_min_pixels", 4)])
def test_winograd_sampling_gives_the_images_of_the_native_kernels(inputs, monkeypatch, key, m):
    """eval.fast_paths.conv_winograd_min_pixels or conv_winograd4_min_pixels: 64 (the tiny UNet's 8x8
    latent level) beside sdpa alone."""
    params = config()["model"]["params"]
    native = ImageGenerator(params, inputs.sd_checkpoint, "cpu", ddim_steps=DDIM_STEPS, fast_paths={"attention": "sdpa"})
    winograd = ImageGenerator(params, inputs.sd_checkpoint, "cpu", ddim_steps=DDIM_STEPS,
                              fast_paths={"attention": "sdpa", key: 64})
    model = unet()
    x_T = initial_latents(range(len(PROMPTS)), native.latent_shape, 0)
    reference = native.generate(model, PROMPTS, x_T)
    calls, made = [], counting_filter_transforms(monkeypatch)
    monkeypatch.setattr(sdcore.conv, "conv2d_winograd",
                        lambda x, weight, *args: calls.append((tuple(x.shape[-2:]), weight, args[2]))
                        or conv2d_winograd(x, weight, *args))
    images = winograd.generate(model, PROMPTS, x_T)
    assert (images - reference).abs().max().item() <= IMAGE_ATOL
    assert {(side, m) for side, _, m in calls} == {((8, 8), m)}  # the 8x8 level only
    assert len(calls) >= 2 * DDIM_STEPS  # every guided step
    assert len(made) == len({id(weight) for _, weight, _ in calls})  # each layer's filters transformed once
    assert kernel_settings(model) == ({"math"}, {False}, {(0, 0, 0, False)})
    assert all(conv.winograd_filters is None for conv in model.modules() if isinstance(conv, Conv2d))  # dropped


def test_sampling_kernels_set_what_is_given_and_restore_each_module():
    model = UNetModel(**tiny_model_params()["unet_config"]["params"])
    set_attention_backend(model, "sdpa")
    set_conv_gemm(model, 16, winograd_min_pixels=1024)
    own = kernel_settings(model)
    with sampling_kernels(model, EvalFastPaths(onednn_linear=True, conv_gemm_max_pixels=64)):
        assert kernel_settings(model) == ({"sdpa"}, {True}, {(64, 1024, 0, True)})  # attention None: the UNet's own
    assert kernel_settings(model) == own
    with sampling_kernels(model, EvalFastPaths(conv_gemm_max_pixels=64, conv_winograd_min_pixels=256,
                                               conv_winograd4_min_pixels=1024)):
        assert kernel_settings(model) == ({"sdpa"}, {False}, {(64, 256, 1024, False)})  # onednn_linear None: the UNet's own
    assert kernel_settings(model) == own
    with pytest.raises(RuntimeError, match="inside"), sampling_kernels(model, EvalFastPaths(attention="math")):
        assert kernel_settings(model)[0] == {"math"}
        raise RuntimeError("inside")
    assert kernel_settings(model) == own


def test_keep_freed_memory_is_set_by_the_image_generator(inputs, monkeypatch):
    """The heap policy itself is tested in a subprocess (tests/test_fast_paths.py): it is the process's."""
    calls = []
    monkeypatch.setattr(sdcore.evaluate, "keep_freed_memory", lambda: calls.append(True) or True)
    ImageGenerator(config()["model"]["params"], inputs.sd_checkpoint, "cpu", ddim_steps=DDIM_STEPS)
    assert calls == []
    ImageGenerator(config()["model"]["params"], inputs.sd_checkpoint, "cpu", ddim_steps=DDIM_STEPS,
                   fast_paths={"keep_freed_memory": True})
    assert calls == [True]


@pytest.mark.compile
def test_compiled_sampling_gives_the_images_of_the_eager_unet(inputs):
    """eval.fast_paths.compile: the UNet through torch.compile (inductor's fused kernels round otherwise)."""
    eager = ImageGenerator(config()["model"]["params"], inputs.sd_checkpoint, "cpu", ddim_steps=DDIM_STEPS)
    compiled = ImageGenerator(config()["model"]["params"], inputs.sd_checkpoint, "cpu", ddim_steps=DDIM_STEPS,
                              fast_paths={"compile": True})
    model = unet()
    x_T = initial_latents(range(len(PROMPTS)), eager.latent_shape, 0)
    reference = eager.generate(model, PROMPTS, x_T)
    images = compiled.generate(model, PROMPTS, x_T)
    assert (images - reference).abs().max().item() <= IMAGE_ATOL
    first = compiled._compiled[1]
    assert isinstance(first, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.generate(model, PROMPTS, x_T).equal(images)
    assert compiled._compiled[1] is first  # compiled once per UNet
    assert not isinstance(model, torch._dynamo.eval_frame.OptimizedModule)  # the caller's UNet is untouched


def test_fast_inception_gives_the_features_of_the_faithful_network(inputs):
    images = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    reference = InceptionV3Features(inputs.inception)(images)
    fast = InceptionV3Features(inputs.inception).speed_up_()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    features = fast(images)
    error = ((features - reference).abs().max() / reference.abs().max()).item()
    assert error <= FEATURE_RTOL, f"features differ by {error:.2e} of their largest value"


@pytest.mark.slow
def test_evaluation_with_every_speed_path_scores_like_the_faithful_one(inputs):
    model = unet()
    faithful = Evaluator(config(), inputs, "cpu").evaluate(model, samples_seen=8, seed=3)
    fast = Evaluator(config({"attention": "sdpa", "onednn_linear": True, "conv_gemm_max_pixels": 16,
                             "conv_winograd_min_pixels": 64, "fast_inception": True}),
                     inputs, "cpu").evaluate(model, samples_seen=8, seed=3)
    assert abs(fast["fid"] - faithful["fid"]) <= FID_RTOL * faithful["fid"]
    assert abs(fast["clip"] - faithful["clip"]) <= CLIP_ATOL


def test_eval_fast_paths_config():
    assert EvalFastPaths.from_config(None) == EvalFastPaths() == EvalFastPaths(
        attention=None, onednn_linear=None, conv_gemm_max_pixels=None, conv_winograd_min_pixels=None,
        conv_winograd4_min_pixels=None, fast_inception=False, compile=False, keep_freed_memory=False)
    assert EvalFastPaths.from_config({"onednn_linear": True, "conv_gemm_max_pixels": 64}) == EvalFastPaths(
        onednn_linear=True, conv_gemm_max_pixels=64)
    for key in ("conv_gemm_max_pixels", "conv_winograd_min_pixels", "conv_winograd4_min_pixels"):
        with pytest.raises(ValueError, match=key):
            EvalFastPaths.from_config({key: -1})
    assert EvalFastPaths.from_config({"compile": True}).compile
    assert EvalFastPaths.from_config({"attention": "sdpa"}).attention == "sdpa"
    assert EvalFastPaths.from_config({"attention": "onednn"}).attention == "onednn"
    with pytest.raises(ValueError, match="attention"):
        EvalFastPaths.from_config({"attention": "flash"})
    with pytest.raises(ValueError, match="unknown key"):
        EvalFastPaths.from_config({"channels_last": True})
