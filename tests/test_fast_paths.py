"""Each fast path against faithful fp32 eager on the golden tiny UNet: output and gradients.

Tolerances: sdpa and channels-last are exact reorderings of fp32 arithmetic (1e-5 absolute);
autocast is compared relative to the output's scale (max |out|) and the gradient's norm:
bf16 (8-bit mantissa) within 2 % of the output scale and 1 % relative gradient error, fp16
within 0.5 % and 0.5 %; torch.compile (fp32, fused kernels) within 1e-4 absolute, on a two-level variant of the golden
config because compiling the golden model's forward and backward takes over 20 minutes here.
The optimizer: foreach AdamW (the default) bitwise equals the per-tensor loop; fused AdamW stays
within 1e-6 of it (relative, weights after 5 steps).
"""

import collections
import dataclasses
import gc
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import sdcore.attention
from sdcore.attention import CPU_LOW_PRECISION_FUSED_BACKWARD_MIN_QUERIES, ONEDNN_ATTENTION_MIN_QUERIES, CrossAttention
from sdcore.precision import FastPaths, PersistentWeightCasts
from sdcore.unet import UNetModel



@pytest.fixture(scope="module")
def golden(reference):
    return reference.golden("unet")


def golden_unet(golden) -> UNetModel:
    model = UNetModel(**golden["config"])
    model.load_state_dict(golden["state_dict"], strict=True)
    return model


def forward_backward(model: UNetModel, inputs, fast_paths: FastPaths):
    """Output and flattened parameter gradient of an MSE-to-one loss through the fast path."""
    runnable = fast_paths.apply(model)
    with fast_paths.autocast_context("cpu"):
        out = runnable(*inputs)
    (out.float() - 1).square().mean().backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters()])
    return out.detach(), grad


def golden_inputs(golden):
    return golden["x"], golden["t"], golden["context"]


@pytest.fixture(scope="module")
def eager_fp32(golden):
    return forward_backward(golden_unet(golden), golden_inputs(golden), FastPaths())


def assert_close_to_eager(eager_fp32, out, grad, out_atol, grad_rel):
    ref_out, ref_grad = eager_fp32
    assert out.shape == ref_out.shape
    assert torch.isfinite(grad).all()
    out_err = (out.float() - ref_out).abs().max().item()
    grad_err = ((grad - ref_grad).norm() / ref_grad.norm()).item()
    assert out_err <= out_atol, f"output max abs error {out_err:.3g} > {out_atol:.3g}"
    assert grad_err <= grad_rel, f"gradient relative error {grad_err:.3g} > {grad_rel:.3g}"


def test_eager_fp32_matches_golden(golden, eager_fp32):
    torch.testing.assert_close(eager_fp32[0], golden["out"], atol=1e-5, rtol=0)


ALL_MAPS = 1 << 20  # conv_gemm_max_pixels that sends every eligible convolution to the GEMM kernel


@pytest.mark.parametrize("fast_paths", [
    FastPaths(attention="sdpa"),
    FastPaths(channels_last=True),
    FastPaths(attention="sdpa", channels_last=True),
    FastPaths(conv_gemm_max_pixels=ALL_MAPS),
    FastPaths(attention="sdpa", channels_last=True, conv_gemm_max_pixels=ALL_MAPS),
    FastPaths(onednn_linear=True),
    FastPaths(attention="sdpa", conv_gemm_max_pixels=ALL_MAPS, onednn_linear=True),
    FastPaths(conv_winograd_min_pixels=1),
    FastPaths(attention="sdpa", conv_gemm_max_pixels=4, conv_winograd_min_pixels=16, onednn_linear=True),
    FastPaths(conv_winograd4_min_pixels=1),
    FastPaths(attention="sdpa", conv_gemm_max_pixels=4, conv_winograd_min_pixels=16, conv_winograd4_min_pixels=256,
              onednn_linear=True),
], ids=["sdpa", "channels_last", "sdpa+channels_last", "conv_gemm", "sdpa+channels_last+conv_gemm", "onednn_linear",
        "sdpa+conv_gemm+onednn_linear", "conv_winograd", "sdpa+conv_gemm+conv_winograd+onednn_linear", "conv_winograd4",
        "sdpa+conv_gemm+conv_winograd+conv_winograd4+onednn_linear"])
def test_fp32_fast_paths_match_eager(golden, eager_fp32, fast_paths):
    out, grad = forward_backward(golden_unet(golden), golden_inputs(golden), fast_paths)
    assert out.dtype == torch.float32
    assert_close_to_eager(eager_fp32, out, grad, out_atol=1e-5, grad_rel=1e-5)


@pytest.mark.parametrize("fast_paths, out_rel, grad_rel, dtype", [
    (FastPaths(autocast="bf16"), 0.02, 0.01, torch.bfloat16),
    (FastPaths(attention="sdpa", channels_last=True, autocast="bf16"), 0.02, 0.01, torch.bfloat16),
    (FastPaths(attention="sdpa", channels_last=True, autocast="bf16", conv_gemm_max_pixels=ALL_MAPS),
     0.02, 0.01, torch.bfloat16),
    (FastPaths(attention="sdpa", autocast="bf16", conv_gemm_max_pixels=4, conv_winograd_min_pixels=16,
               persistent_weight_casts=True), 0.02, 0.01, torch.bfloat16),
    (FastPaths(autocast="fp16"), 0.005, 0.005, torch.float16),
], ids=["bf16", "sdpa+channels_last+bf16", "sdpa+channels_last+bf16+conv_gemm", "sdpa+bf16+conv_gemm+conv_winograd+casts",
        "fp16"])
def test_autocast_matches_eager_within_stated_tolerance(golden, eager_fp32, fast_paths, out_rel, grad_rel, dtype):
    out, grad = forward_backward(golden_unet(golden), golden_inputs(golden), fast_paths)
    assert out.dtype == dtype
    scale = eager_fp32[0].abs().max().item()
    assert_close_to_eager(eager_fp32, out, grad, out_atol=out_rel * scale, grad_rel=grad_rel)


def mini_unet(golden) -> UNetModel:
    """Two-level variant of the golden config (every block type, fewer distinct shapes), so
    inductor compiles forward and backward in minutes; zero-initialised layers get random
    weights so that every gradient is non-trivial."""
    torch.manual_seed(0)
    model = UNetModel(**{**golden["config"], "channel_mult": [1, 2], "num_res_blocks": 1,
                         "attention_resolutions": [1, 2]})
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.05)
    return model


@pytest.mark.compile
def test_compiled_model_matches_eager(golden):
    inputs = (golden["x"], golden["t"], golden["context"])
    eager = forward_backward(mini_unet(golden), inputs, FastPaths())
    out, grad = forward_backward(mini_unet(golden), inputs, FastPaths(compile=True))
    assert_close_to_eager(eager, out, grad, out_atol=1e-4, grad_rel=1e-4)


@pytest.mark.compile
@pytest.mark.parametrize("conv_gemm_max_pixels", [0, ALL_MAPS], ids=["onednn_convs", "gemm_convs"])
def test_compiled_persistent_weight_casts_match_eager_within_bf16_rounding(golden, conv_gemm_max_pixels):
    """torch.compile over persistent weight casts (the wrapper is what gets compiled), with the
    convolutions on oneDNN or all on the GEMM kernel (the recommended bf16 path compiled): over two
    steps the output and fp32 gradients stay within the bf16 tolerance of fp32 eager on the same
    weights, and the first step's weight update reaches the casts of the second."""
    inputs = (golden["x"], golden["t"], golden["context"])
    paths = FastPaths(attention="sdpa", autocast="bf16", persistent_weight_casts=True,
                      conv_gemm_max_pixels=conv_gemm_max_pixels)
    eager, compiled = mini_unet(golden), mini_unet(golden)
    runnable = dataclasses.replace(paths, compile=True).apply(compiled)
    outputs = []
    for step in range(2):
        eager.load_state_dict(compiled.state_dict())
        eager.zero_grad(set_to_none=True)
        want = forward_backward(eager, inputs, FastPaths())
        outputs.append(want[0])
        with paths.autocast_context("cpu"):
            out = runnable(*inputs)
        (out.float() - 1).square().mean().backward()
        grad = torch.cat([p.grad.flatten() for p in compiled.parameters()])
        assert out.dtype == torch.bfloat16 and grad.dtype == torch.float32
        scale = want[0].abs().max().item()
        assert_close_to_eager(want, out.detach(), grad, out_atol=0.02 * scale, grad_rel=0.01)
        with torch.no_grad():
            for p in compiled.parameters():
                p -= 0.5 * p.grad
        compiled.zero_grad(set_to_none=True)
    # the update moved the output by more than the tolerance: stale casts would have failed step 2
    assert (outputs[1] - outputs[0]).abs().max().item() > 0.1 * outputs[0].abs().max().item()


def test_compile_returns_wrapper_sharing_parameters(golden):
    model = UNetModel(**golden["config"])
    compiled = FastPaths(compile=True).apply(model)
    assert compiled is not model
    assert {id(p) for p in compiled.parameters()} == {id(p) for p in model.parameters()}


def test_channels_last_converts_conv_weights(golden):
    model = FastPaths(channels_last=True).apply(UNetModel(**golden["config"]))
    weight = model.input_blocks[0][0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()


def test_autocast_context_and_config():
    assert FastPaths.from_config({"attention": "sdpa", "channels_last": True, "compile": False}, "bf16") == \
        FastPaths(attention="sdpa", channels_last=True, autocast="bf16")
    assert FastPaths.from_config({}, "fp16").autocast_dtype == torch.float16
    assert FastPaths().autocast_dtype is None
    with FastPaths(autocast="bf16").autocast_context("cpu"):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.bfloat16
    with FastPaths().autocast_context(torch.device("cpu")):
        assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32


@pytest.mark.parametrize("kwargs, message", [
    ({"attention": "flash"}, "attention"),
    ({"autocast": "int8"}, "autocast"),
    ({"conv_gemm_max_pixels": -1}, "conv_gemm_max_pixels"),
    ({"conv_winograd_min_pixels": -1}, "conv_winograd_min_pixels"),
    ({"conv_winograd4_min_pixels": -1}, "conv_winograd4_min_pixels"),
    ({"persistent_weight_casts": True}, "needs autocast"),
])
def test_invalid_switches_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FastPaths(**kwargs)


def test_invalid_precision_name_is_rejected():
    with pytest.raises(ValueError):
        FastPaths.from_config({}, "fp8")


@pytest.mark.parametrize("set_to_none", [True, False], ids=["grads_set_to_none", "grads_zeroed"])
def test_persistent_weight_casts_equal_autocast_bitwise(golden, set_to_none):
    """Same casts, same low-precision gradients: outputs and fp32 gradients are identical to
    plain autocast, over three steps (the buffers are refilled after the weights change), whether
    a step's gradients are adopted (``.grad`` None) or added to zeroed ones."""
    inputs = golden_inputs(golden)
    plain, persistent = golden_unet(golden), golden_unet(golden)
    paths = FastPaths(attention="sdpa", autocast="bf16", conv_gemm_max_pixels=ALL_MAPS)
    runnable = {"plain": paths.apply(plain),
                "persistent": dataclasses.replace(paths, persistent_weight_casts=True).apply(persistent)}
    for step in range(3):
        results = {}
        for name, model in runnable.items():
            with paths.autocast_context("cpu"):
                out = model(*inputs)
            out.float().square().mean().backward()
            results[name] = out
        torch.testing.assert_close(results["persistent"], results["plain"], atol=0, rtol=0)
        for (name, p), q in zip(plain.named_parameters(), persistent.parameters()):
            torch.testing.assert_close(q.grad, p.grad, atol=0, rtol=0, msg=f"step {step}: {name}")
            assert q.grad.dtype == torch.float32
        with torch.no_grad():
            for p, q in zip(plain.parameters(), persistent.parameters()):
                p -= 0.1 * p.grad
                q -= 0.1 * q.grad
        plain.zero_grad(set_to_none=True)
        persistent.zero_grad(set_to_none=set_to_none)
    cast_names = runnable["persistent"].cast_params
    assert cast_names and all("norm" not in n for n in cast_names)


@pytest.mark.parametrize("sharing", ["module_used_twice", "weight_tied"])
def test_persistent_weight_casts_leave_shared_parameters_in_place(sharing):
    """A submodule used twice, or one weight tied into two layers: the outputs and gradients are
    plain autocast's, and after the call each module holds its fp32 Parameter again (not the cast)."""
    def build():
        torch.manual_seed(0)
        first, second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        if sharing == "weight_tied":
            second.weight = first.weight
        return torch.nn.Sequential(first, torch.nn.GELU(), first if sharing == "module_used_twice" else second)
    plain, persistent = build(), build()
    runnable = PersistentWeightCasts(persistent, torch.bfloat16)
    x = torch.randn(3, 8)
    for step in range(2):
        outs = []
        for model in (plain, runnable):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            out.float().square().sum().backward()
            outs.append(out)
        torch.testing.assert_close(outs[1], outs[0], atol=0, rtol=0)
        for (name, p), (_, q) in zip(plain.named_parameters(remove_duplicate=False),
                                     persistent.named_parameters(remove_duplicate=False)):
            assert type(q) is torch.nn.Parameter and q.dtype == torch.float32, (step, name)
            torch.testing.assert_close(q.grad, p.grad, atol=0, rtol=0, msg=f"step {step}: {name}")
        plain.zero_grad(set_to_none=True)
        persistent.zero_grad(set_to_none=True)


class _WeightSizedOps(TorchDispatchMode):
    """Counts the aten ops that read or write an fp32 tensor of a cast parameter's shape."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.count = shapes, collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if any(isinstance(a, torch.Tensor) and a.dtype == torch.float32 and tuple(a.shape) in self.shapes
               for a in (*args, out)):
            self.count[func.overloadpacket.__name__] += 1
        return out


def test_persistent_weight_casts_hand_the_last_steps_gradient_memory_to_autograd(golden):
    """With ``zero_grad(set_to_none=True)`` a step's cast-weight gradients are converted into the
    memory of the last step's, which AccumulateGrad adopts as ``.grad``: no zero fill, no add, no
    allocation of weight-sized fp32 memory after the first step. Dropping the wrapper removes its hooks."""
    unet = golden_unet(golden)
    runnable = FastPaths(attention="sdpa", autocast="bf16", persistent_weight_casts=True).apply(unet)
    cast = runnable.cast_params
    memory, ops = [], []
    for _ in range(3):
        counter = _WeightSizedOps({tuple(p.shape) for p in cast.values()})
        with counter, torch.autocast("cpu", dtype=torch.bfloat16):
            out = runnable(*golden_inputs(golden))
            out.float().square().mean().backward()
        memory.append({name: p.grad.untyped_storage().data_ptr() for name, p in cast.items()})
        ops.append(counter.count)
        unet.zero_grad(set_to_none=True)
    assert memory[2] == memory[1] == memory[0]
    for step in ops[1:]:
        assert not {"add_", "add", "fill_", "zero_", "zeros_like", "empty_like", "empty"} & set(step), step
        assert step["copy_"] >= 2 * len(cast)  # the weight casts, and the gradient conversions into the buffers
    del runnable, out
    gc.collect()
    assert not any(p._post_accumulate_grad_hooks for p in unet.parameters())


@pytest.mark.parametrize("queries", [CPU_LOW_PRECISION_FUSED_BACKWARD_MIN_QUERIES // 2,
                                     CPU_LOW_PRECISION_FUSED_BACKWARD_MIN_QUERIES])
def test_sdpa_attention_trained_in_bf16_on_a_cpu(queries):
    """bf16 training on a CPU: below the threshold the sdpa backend runs the math kernel (bitwise the
    math backend's output and gradients); from it on, the fused kernel (on contiguous heads), within
    bf16 rounding of math and not bitwise equal to it."""
    torch.manual_seed(0)
    modules = {backend: CrossAttention(320, heads=5, dim_head=64, attention_backend=backend)
               for backend in ("math", "sdpa")}
    modules["sdpa"].load_state_dict(modules["math"].state_dict())
    x = torch.randn(2, queries, 320)
    results = {}
    for backend, module in modules.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = module(x)
        out.float().square().mean().backward()
        results[backend] = (out, module.to_q.weight.grad, module.to_k.weight.grad)
    for fused, math in zip(results["sdpa"], results["math"]):
        if queries < CPU_LOW_PRECISION_FUSED_BACKWARD_MIN_QUERIES:
            torch.testing.assert_close(fused, math, atol=0, rtol=0)
        else:
            torch.testing.assert_close(fused.float(), math.float(), atol=0.02 * math.abs().max().item(), rtol=0.02)
    if queries >= CPU_LOW_PRECISION_FUSED_BACKWARD_MIN_QUERIES:
        assert not torch.equal(results["sdpa"][1], results["math"][1])


def attention_pair(context_dim=None):
    torch.manual_seed(0)
    modules = {backend: CrossAttention(64, context_dim, heads=4, dim_head=16, attention_backend=backend)
               for backend in ("math", "onednn")}
    modules["onednn"].load_state_dict(modules["math"].state_dict())
    return modules


def counting_onednn_products(monkeypatch) -> list:
    shapes = []
    gemm = sdcore.attention.onednn_gemm
    monkeypatch.setattr(sdcore.attention, "onednn_gemm",
                        lambda a, b: shapes.append((tuple(a.shape), tuple(b.shape))) or gemm(a, b))
    return shapes


@pytest.mark.parametrize("keys", [None, 77], ids=["self", "cross"])
def test_onednn_attention_is_the_math_kernel_in_fp32(monkeypatch, keys):
    """From ONEDNN_ATTENTION_MIN_QUERIES queries: the math kernel's output and every gradient, both
    heads of both samples through oneDNN's GEMM (2 products a head forward, 4 backward; whole heads,
    the query blocks are for calls without a backward)."""
    shapes = counting_onednn_products(monkeypatch)
    monkeypatch.setattr(sdcore.attention, "ONEDNN_ATTENTION_QUERY_BLOCK", 384)
    modules = attention_pair(None if keys is None else 32)
    x = torch.randn(2, ONEDNN_ATTENTION_MIN_QUERIES, 64, requires_grad=True)
    context = None if keys is None else torch.randn(2, keys, 32, requires_grad=True)
    results = {}
    for backend, module in modules.items():
        out = module(x, context)
        inputs = [x] + ([] if context is None else [context]) + list(module.parameters())
        results[backend] = [out, *torch.autograd.grad(out.square().sum(), inputs)]
    assert len(shapes) == 2 * 4 * (2 + 4)
    assert (ONEDNN_ATTENTION_MIN_QUERIES, keys or ONEDNN_ATTENTION_MIN_QUERIES) in {a for a, _ in shapes}  # probabilities
    for got, want in zip(results["onednn"], results["math"]):
        torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)


def test_onednn_attention_without_a_backward_runs_in_query_blocks(monkeypatch):
    shapes = counting_onednn_products(monkeypatch)
    monkeypatch.setattr(sdcore.attention, "ONEDNN_ATTENTION_QUERY_BLOCK", 384)  # blocks 384, 384, 256
    modules = attention_pair()
    x = torch.randn(1, ONEDNN_ATTENTION_MIN_QUERIES, 64)
    with torch.no_grad():
        want, got = modules["math"](x), modules["onednn"](x)
    torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)
    assert [a[0] for a, _ in shapes[::2]] == [384, 384, 256] * 4  # the score blocks of each head


def test_onednn_attention_falls_back_to_sdpa(monkeypatch):
    """Shorter sequences, bf16 autocast: the fused kernel's results bitwise, no oneDNN product."""
    shapes = counting_onednn_products(monkeypatch)
    modules = attention_pair()
    sdpa = CrossAttention(64, heads=4, dim_head=16, attention_backend="sdpa")
    sdpa.load_state_dict(modules["math"].state_dict())
    short = torch.randn(2, ONEDNN_ATTENTION_MIN_QUERIES // 2, 64)
    assert modules["onednn"](short).equal(sdpa(short))
    long = torch.randn(1, ONEDNN_ATTENTION_MIN_QUERIES, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert modules["onednn"](long).equal(sdpa(long))
    assert shapes == []


@pytest.mark.compile
def test_compiled_onednn_attention_is_one_graph_on_the_fused_kernel(monkeypatch):
    """Under torch.compile ``attention: onednn`` takes the fused kernel: the module compiles to one
    graph (fullgraph: no break at the per-head loops or the autograd Function), no oneDNN product
    runs, and output and gradients are the math kernel's."""
    shapes = counting_onednn_products(monkeypatch)
    modules = attention_pair()
    compiled = torch.compile(modules["onednn"], fullgraph=True)
    x = torch.randn(1, ONEDNN_ATTENTION_MIN_QUERIES, 64, requires_grad=True)
    results = {}
    for backend, module in (("math", modules["math"]), ("onednn", compiled)):
        out = module(x)
        results[backend] = [out, *torch.autograd.grad(out.square().sum(), [x, *modules[backend].parameters()])]
    assert shapes == []
    for got, want in zip(results["onednn"], results["math"]):
        torch.testing.assert_close(got, want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)


def test_onednn_attention_in_the_golden_unet_matches_eager(golden, eager_fp32, monkeypatch):
    """Every attention of the golden UNet (16 to 64 tokens) on oneDNN's GEMM, with the threshold lowered."""
    monkeypatch.setattr(sdcore.attention, "ONEDNN_ATTENTION_MIN_QUERIES", 1)
    shapes = counting_onednn_products(monkeypatch)
    paths = FastPaths(attention="onednn", onednn_linear=True, conv_winograd_min_pixels=16)
    out, grad = forward_backward(golden_unet(golden), golden_inputs(golden), paths)
    assert shapes
    assert_close_to_eager(eager_fp32, out, grad, out_atol=1e-5, grad_rel=1e-5)


# ---- memory formats and the recommended fast paths ------------------------------------------------

def _layouts_of_convolution_inputs(model, inputs):
    """(module name, input is channels-last-but-not-contiguous) for every convolution call of a forward pass."""
    seen = []
    hooks = [module.register_forward_pre_hook(
        lambda mod, args, name=name: seen.append((name, not args[0].is_contiguous())))
        for name, module in model.named_modules() if isinstance(module, torch.nn.Conv2d)]
    with torch.no_grad():
        model(*inputs)
    for hook in hooks:
        hook.remove()
    return seen


@pytest.mark.parametrize("fast_paths", [FastPaths(), FastPaths(attention="sdpa", conv_gemm_max_pixels=ALL_MAPS),
                                        FastPaths(attention="sdpa", conv_gemm_max_pixels=16)],
                         ids=["eager", "sdpa+conv_gemm", "recommended_cpu_fp32"])
def test_contiguous_model_keeps_every_activation_contiguous(golden, fast_paths):
    """A contiguous (NCHW) model must feed every convolution a contiguous input: a channels-last
    activation (the spatial transformer's permuted output, the GEMM convolution's pixel-major result)
    against contiguous weights makes oneDNN re-lay the weight out on every call (measured: 17 s of a
    47 s full-size training step on a 2-core Xeon)."""
    model = fast_paths.apply(golden_unet(golden))
    strided = [name for name, channels_last in _layouts_of_convolution_inputs(model, golden_inputs(golden))
               if channels_last]
    assert not strided, f"channels-last inputs to contiguous convolutions: {strided[:5]}"


def test_channels_last_model_stays_channels_last(golden):
    """The other side of the same rule: under channels_last no activation goes back to NCHW (no copies)."""
    model = FastPaths(channels_last=True, conv_gemm_max_pixels=16).apply(golden_unet(golden))
    x, t, context = golden_inputs(golden)
    layouts = []
    hooks = [m.register_forward_pre_hook(lambda mod, args: layouts.append(
        args[0].is_contiguous(memory_format=torch.channels_last)))
        for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(x.contiguous(memory_format=torch.channels_last), t, context)
    for hook in hooks:
        hook.remove()
    assert all(layouts)


def test_recommended_cpu_fp32_path_matches_eager(golden, eager_fp32):
    from sdcore.precision import recommend_fast_paths

    fast_paths = recommend_fast_paths("fp32", "cpu", fp32_gflops=135.0, bf16_gflops=83.0)
    out, grad = forward_backward(golden_unet(golden), golden_inputs(golden), fast_paths)
    assert out.dtype == torch.float32
    assert_close_to_eager(eager_fp32, out, grad, out_atol=1e-5, grad_rel=1e-5)


def test_recommendations_follow_the_measured_peaks():
    from sdcore.precision import (CPU_AVX2_FP32_CONV_WINOGRAD4_MIN_PIXELS, CPU_AVX2_FP32_CONV_WINOGRAD_MIN_PIXELS,
                                  CPU_FP32_CONV_GEMM_MAX_PIXELS, CPU_FP32_CONV_WINOGRAD4_MIN_PIXELS,
                                  CPU_FP32_CONV_WINOGRAD_MIN_PIXELS,
                                  CPU_FP32_ONEDNN_CONV_GEMM_MAX_PIXELS, CPU_LOW_PRECISION_CONV_GEMM_MAX_PIXELS,
                                  recommend_fast_paths, recommend_precision)

    no_amx, amx, avx2 = dict(fp32_gflops=135.0, bf16_gflops=83.0), dict(fp32_gflops=190.0, bf16_gflops=1343.0), \
        dict(fp32_gflops=180.0, bf16_gflops=1.8)
    assert recommend_precision(**no_amx) == recommend_precision(**avx2) == "fp32"
    assert recommend_precision(**amx) == "bf16"
    winograd, winograd4 = CPU_FP32_CONV_WINOGRAD_MIN_PIXELS, CPU_FP32_CONV_WINOGRAD4_MIN_PIXELS
    for peaks in (no_amx, amx, avx2):  # fp32 on any CPU: sdpa + GEMM convolutions on the smallest maps, Winograd on the largest
        assert recommend_fast_paths("fp32", "cpu", **peaks, onednn_fp32_gflops=peaks["fp32_gflops"],
                                    capability="AVX512") == FastPaths(
            attention="sdpa", conv_gemm_max_pixels=CPU_FP32_CONV_GEMM_MAX_PIXELS, conv_winograd_min_pixels=winograd,
            conv_winograd4_min_pixels=winograd4, fused_optimizer=True, keep_freed_memory=True)
    # AVX2 kernels: Winograd from smaller maps, F(4x4, 3x3) too; under autocast F(2x2, 3x3) as with AVX-512
    assert recommend_fast_paths("fp32", "cpu", **avx2, onednn_fp32_gflops=180.0, capability="AVX2") == FastPaths(
        attention="sdpa", conv_gemm_max_pixels=CPU_FP32_CONV_GEMM_MAX_PIXELS,
        conv_winograd_min_pixels=CPU_AVX2_FP32_CONV_WINOGRAD_MIN_PIXELS,
        conv_winograd4_min_pixels=CPU_AVX2_FP32_CONV_WINOGRAD4_MIN_PIXELS, fused_optimizer=True, keep_freed_memory=True)
    assert recommend_fast_paths("bf16", "cpu", **avx2, capability="AVX2").conv_winograd_min_pixels == winograd
    # where MKL's sgemm takes its AVX2 path (AMD EPYC with AVX-512, measured 175 against oneDNN's 321)
    epyc = dict(fp32_gflops=175.0, bf16_gflops=798.0, onednn_fp32_gflops=321.0)
    assert recommend_fast_paths("fp32", "cpu", **epyc, capability="AVX512") == FastPaths(  # with oneDNN's GEMM, 8x8 maps as GEMMs too
        attention="onednn", conv_gemm_max_pixels=CPU_FP32_ONEDNN_CONV_GEMM_MAX_PIXELS, conv_winograd_min_pixels=winograd,
        conv_winograd4_min_pixels=winograd4, onednn_linear=True, fused_optimizer=True, keep_freed_memory=True)
    assert not recommend_fast_paths("bf16", "cpu", **epyc).onednn_linear  # inert under autocast: not set
    assert not recommend_fast_paths("fp32", "cpu", fp32_gflops=175.0, bf16_gflops=1.0,
                                    onednn_fp32_gflops=200.0).onednn_linear  # within the margin
    assert recommend_fast_paths("bf16", "cpu", **amx) == FastPaths(
        attention="sdpa", autocast="bf16", conv_gemm_max_pixels=CPU_LOW_PRECISION_CONV_GEMM_MAX_PIXELS,
        persistent_weight_casts=True, fused_optimizer=True, keep_freed_memory=True)
    # bf16 asked for where it is slow: the run's precision is kept, the fp32 kernel choices apply but
    # F(4x4, 3x3), whose bf16 products round its larger transformed values
    assert recommend_fast_paths("bf16", "cpu", **no_amx) == FastPaths(
        attention="sdpa", autocast="bf16", conv_gemm_max_pixels=CPU_FP32_CONV_GEMM_MAX_PIXELS,
        conv_winograd_min_pixels=winograd, fused_optimizer=True, keep_freed_memory=True)
    assert recommend_fast_paths("fp16", "cuda") == FastPaths(attention="sdpa", channels_last=True, autocast="fp16",
                                                             fused_optimizer=True)
    # every recommendation is a valid switch set that FastPaths.from_config accepts back
    for precision in ("fp32", "bf16", "fp16"):
        paths = recommend_fast_paths(precision, "cpu", **amx)
        block = {k: v for k, v in dataclasses.asdict(paths).items() if k != "autocast"}
        assert FastPaths.from_config(block, precision) == paths


_PAGE_FAULTS_PER_STEP = """
import resource, sys, torch
from sdcore.precision import FastPaths
if sys.argv[1] == "keep":
    FastPaths(keep_freed_memory=True).apply(torch.nn.Linear(1, 1))
def step():  # a training step's pattern: the same large blocks written, then freed, every step
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    blocks = [torch.ones(mb << 20, dtype=torch.uint8) for mb in (48, 64, 96, 64)]
    del blocks
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(*[step() for _ in range(12)])
"""


def test_keep_freed_memory_steps_without_page_faults():
    """Steps that write and free the same 272 MB: glibc's default maps the blocks fresh every step
    (a fault per page, 69 k); with ``keep_freed_memory`` (set through ``FastPaths.apply``) the heap
    grows over the first steps, then serves every step from memory it kept."""
    faults = {policy: [int(n) for n in subprocess.run(
                  [sys.executable, "-c", _PAGE_FAULTS_PER_STEP, policy],
                  check=True, capture_output=True, text=True).stdout.split()]
              for policy in ("default", "keep")}
    assert min(faults["default"]) > 60_000 and max(faults["keep"][-3:]) < 100, faults


def adamw_weights(golden, steps: int = 5, **options) -> torch.Tensor:
    """The golden UNet's weights after ``steps`` AdamW steps on its own MSE-to-one gradients."""
    torch.manual_seed(0)
    model = golden_unet(golden)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, **options)
    for _ in range(steps):
        optimizer.zero_grad()
        (model(*golden_inputs(golden)) - 1).square().mean().backward()
        optimizer.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_optimizer_default_is_the_loop_bitwise_and_fused_is_close(golden):
    assert FastPaths().optimizer_options == {"foreach": True}
    assert FastPaths(fused_optimizer=True).optimizer_options == {"fused": True}
    loop = adamw_weights(golden, foreach=False)
    assert torch.equal(adamw_weights(golden, **FastPaths().optimizer_options), loop)
    fused = adamw_weights(golden, **FastPaths(fused_optimizer=True).optimizer_options)
    assert ((fused - loop).norm() / loop.norm()).item() < 1e-6
