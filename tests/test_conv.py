"""The GEMM convolution fast path (sdcore.conv) against F.conv2d, and when it applies."""

import pytest
import torch

import sdcore.conv
from sdcore.conv import Conv2d, conv2d_gemm, set_conv_gemm
from test_linear import _AtenOps
from sdcore.precision import FastPaths
from sdcore.unet import UNetModel


@pytest.mark.parametrize("onednn", [False, True], ids=["blas_gemm", "onednn_gemm"])
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gemm_matches_conv2d_fp32(kernel, bias, channels_last, onednn):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(24, 40, kernel, padding=kernel // 2, bias=bias)
    x = torch.randn(3, 24, 5, 7, requires_grad=True)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
    inp = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    ref = conv(inp)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *conv.parameters()])
    ops = _AtenOps()
    with ops:
        out = conv2d_gemm(inp, conv.weight, conv.bias, onednn=onednn)
        grads = torch.autograd.grad(out.square().sum(), [x, *conv.parameters()])
    assert ("_linear_pointwise" in ops.names) == onednn and ("mm" in ops.names) != onednn, ops.names
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_gemm_under_autocast_rounds_like_the_convolution():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(64, 64, 3, padding=1)
    x = torch.randn(2, 64, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref, out = conv(x), conv2d_gemm(x, conv.weight, conv.bias)
    assert out.dtype == ref.dtype == torch.bfloat16
    # Both accumulate in fp32 and round once: at most a couple of bf16 ulps apart.
    torch.testing.assert_close(out.float(), ref.float(), atol=0.02 * ref.abs().max().item(), rtol=0)


def counting_gemm(monkeypatch) -> list:
    calls = []

    def spy(*args):
        calls.append(args[0].shape)
        return conv2d_gemm(*args)

    monkeypatch.setattr(sdcore.conv, "conv2d_gemm", spy)
    return calls


def test_threshold_and_eligibility(monkeypatch):
    calls = counting_gemm(monkeypatch)
    same, strided = Conv2d(8, 8, 3, padding=1), Conv2d(8, 8, 3, stride=2, padding=1)
    assert set_conv_gemm(torch.nn.Sequential(same, strided), 16) == 2
    same(torch.randn(1, 8, 4, 4))        # 16 pixels: GEMM
    same(torch.randn(1, 8, 4, 5))        # 20 pixels: native
    strided(torch.randn(1, 8, 4, 4))     # stride 2: native
    assert calls == [torch.Size([1, 8, 4, 4])]
    set_conv_gemm(same, 0)
    same(torch.randn(1, 8, 4, 4))
    assert len(calls) == 1


def test_unet_routes_its_small_maps_through_gemm(monkeypatch):
    """At a 16x16 input and a 64-pixel threshold, exactly the convolutions of the 8x8 and 4x4
    levels of a three-level UNet take the GEMM kernel."""
    calls = counting_gemm(monkeypatch)
    torch.manual_seed(0)
    model = UNetModel(image_size=16, in_channels=4, out_channels=4, model_channels=32,
                      num_res_blocks=1, attention_resolutions=[2], channel_mult=[1, 2, 2],
                      num_head_channels=16, use_spatial_transformer=True, transformer_depth=1,
                      context_dim=32, use_linear_in_transformer=True, legacy=False)
    FastPaths(conv_gemm_max_pixels=64).apply(model)
    model(torch.randn(1, 4, 16, 16), torch.tensor([10]), torch.randn(1, 5, 32))
    sizes = {tuple(shape[-2:]) for shape in calls}
    assert sizes == {(8, 8), (4, 4)}, sizes
    assert len(calls) >= 8


@pytest.mark.parametrize("uses", [1, 2], ids=["once", "twice_in_one_graph"])
def test_kept_weight_gradient_is_autograds_bitwise(uses):
    """Under bf16 a GEMM layer writes its weight gradient into memory it keeps across steps: the
    gradients are bitwise those of plain autograd over the same products, over steps that change
    the weights, also when the layer runs twice on one cast of its weight (its second use must not
    write into the memory where autograd still holds the first use's gradient)."""
    torch.manual_seed(0)
    kept = Conv2d(32, 32, 3, padding=1)
    kept.gemm_max_pixels = 64
    plain = torch.nn.Conv2d(32, 32, 3, padding=1)
    plain.load_state_dict(kept.state_dict())

    def forward(conv, weight_grad):
        def run(inp):  # one cast of each parameter per forward, as the persistent weight casts
            weight, bias = conv.weight.to(torch.bfloat16), conv.bias.to(torch.bfloat16)
            for _ in range(uses):
                inp = conv2d_gemm(inp, weight, bias, weight_grad)
            return inp
        return run

    x = torch.randn(2, 32, 4, 4)
    for step in range(3):
        grads = {}
        for name, conv, weight_grad in (("kept", kept, kept.kept_weight_grad), ("plain", plain, None)):
            inp = x.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = forward(conv, weight_grad)(inp)
            out.float().square().sum().backward()
            grads[name] = (out, inp.grad, conv.weight.grad, conv.bias.grad)
        for got, want in zip(grads["kept"], grads["plain"]):
            torch.testing.assert_close(got, want, atol=0, rtol=0, msg=f"step {step}")
        with torch.no_grad():
            for conv in (kept, plain):
                conv.weight -= 0.1 * conv.weight.grad
                conv.weight.grad = conv.bias.grad = None


def test_kept_weight_gradient_memory_is_reused_across_steps():
    """The same bf16 memory every step (no weight-sized allocation); in fp32 nothing is kept."""
    torch.manual_seed(0)
    conv = Conv2d(32, 32, 3, padding=1)
    conv.gemm_max_pixels = 64
    x = torch.randn(2, 32, 4, 4)
    addresses = set()
    for _ in range(3):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            conv(x).float().sum().backward()
        buffer = conv.kept_weight_grad.borrow()
        assert buffer is not None and buffer.dtype == torch.bfloat16 and buffer.shape == (32, 32 * 9)
        addresses.add(buffer.data_ptr())
        conv.kept_weight_grad.give_back(buffer)
    assert len(addresses) == 1
    # fp32: the weight is the leaf parameter, its gradient becomes .grad, nothing is kept.
    fresh = Conv2d(32, 32, 3, padding=1)
    fresh.gemm_max_pixels = 64
    fresh(x).sum().backward()
    assert fresh.kept_weight_grad.borrow() is None and fresh.weight.grad is not None
