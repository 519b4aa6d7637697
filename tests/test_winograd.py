"""The Winograd convolution fast path (sdcore.winograd) against F.conv2d, and when it applies.

In float64 the algorithm is exact up to rounding (its transforms' entries are 0, +-1/2, +-1), so a
wrong sign or tile offset anywhere in a transform or its adjoint shows as an O(1) error there. In
fp32 and under bf16 autocast it is held to the native convolution's own error against float64.
"""

import pytest
import torch
import torch.nn.functional as F

import sdcore.conv
from sdcore.conv import Conv2d, set_conv_gemm
from sdcore.precision import FastPaths
from sdcore.winograd import conv2d_winograd
from test_linear import _AtenOps


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def conv_and_grads(conv, x, weight, bias, grad_out):
    out = conv(x, weight, bias)
    inputs = [x, weight] + ([bias] if bias is not None else [])
    return [out, *torch.autograd.grad(out, inputs, grad_out.to(out.dtype))]


def native(x, weight, bias):
    return F.conv2d(x, weight, bias, padding=1)


def case(n, c_in, c_out, h, w, bias, channels_last, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(n, c_in, h, w, dtype=dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(c_out, c_in, 3, 3, dtype=dtype) / (3 * c_in ** 0.5)
    b = torch.randn(c_out, dtype=dtype) if bias else None
    grad_out = torch.randn(n, c_out, h, w, dtype=dtype)
    return [t.requires_grad_() if t is not None else None for t in (x, weight, b)] + [grad_out]


SHAPES = [(2, 5, 7, 6, 8, True, False), (1, 3, 4, 2, 2, False, True), (3, 16, 8, 4, 10, True, True)]


@pytest.mark.parametrize("n, c_in, c_out, h, w, bias, channels_last", SHAPES)
def test_winograd_is_the_convolution_in_float64(n, c_in, c_out, h, w, bias, channels_last):
    x, weight, b, grad_out = case(n, c_in, c_out, h, w, bias, channels_last)
    want = conv_and_grads(native, x, weight, b, grad_out)
    got = conv_and_grads(conv2d_winograd, x, weight, b, grad_out)
    assert got[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert got[1].shape == x.shape
    for g, r in zip(got, want):
        assert relative_error(g, r) < 1e-12


@pytest.mark.parametrize("onednn", [False, True], ids=["bmm", "onednn_gemm"])
def test_winograd_fp32_is_as_close_to_float64_as_the_native_convolution(onednn):
    x64, w64, b64, grad_out = case(2, 48, 40, 8, 12, True, False)
    want = conv_and_grads(native, x64, w64, b64, grad_out)
    x, weight, b = (t.detach().float().requires_grad_() for t in (x64, w64, b64))
    ops = _AtenOps()
    with ops:
        got = conv_and_grads(lambda *a: conv2d_winograd(*a, onednn=onednn), x, weight, b, grad_out.float())
    assert ("_linear_pointwise" in ops.names) == onednn and ("bmm" in ops.names) != onednn, ops.names
    assert all(t.dtype == torch.float32 for t in got)
    reference = conv_and_grads(native, x, weight, b, grad_out.float())
    for g, n, r in zip(got, reference, want):
        # measured: within 2x the native fp32 convolution's error, both near 1e-7
        assert relative_error(g, r) <= max(4 * relative_error(n, r), 1e-6)


def test_winograd_under_bf16_autocast_rounds_like_the_convolution():
    """Products in bf16, transforms in fp32: measured 1.5-2.2x the native bf16 convolution's error
    against float64 (output and gradients), which is a couple of bf16 ulps."""
    x64, w64, b64, grad_out = case(4, 64, 48, 16, 16, True, False)
    want = conv_and_grads(native, x64, w64, b64, grad_out)
    x, weight, b = (t.detach().float().requires_grad_() for t in (x64, w64, b64))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = conv_and_grads(conv2d_winograd, x, weight, b, grad_out.float())
        reference = conv_and_grads(native, x, weight, b, grad_out.float())
    assert got[0].dtype == reference[0].dtype == torch.bfloat16
    assert [t.dtype for t in got[1:]] == [torch.float32] * 3
    for g, n, r in zip(got, reference, want):
        assert relative_error(g, r) <= max(3 * relative_error(n, r), 1e-3)
        assert relative_error(g, r) < 0.02


def counting_winograd(monkeypatch) -> list:
    calls = []

    def spy(x, *args):
        calls.append(tuple(x.shape[-2:]))
        return conv2d_winograd(x, *args)

    monkeypatch.setattr(sdcore.conv, "conv2d_winograd", spy)
    return calls


def test_threshold_and_eligibility(monkeypatch):
    calls = counting_winograd(monkeypatch)
    same, strided, pointwise = Conv2d(8, 8, 3, padding=1), Conv2d(8, 8, 3, stride=2, padding=1), Conv2d(8, 8, 1)
    assert set_conv_gemm(torch.nn.Sequential(same, strided, pointwise), 0, winograd_min_pixels=64) == 3
    same(torch.randn(1, 8, 8, 8))        # 64 pixels: Winograd
    same(torch.randn(1, 8, 6, 10))       # 60 pixels: native
    same(torch.randn(1, 8, 9, 8))        # an odd side: native
    strided(torch.randn(1, 8, 8, 8))     # stride 2: native
    pointwise(torch.randn(1, 8, 8, 8))   # 1x1: native
    assert calls == [(8, 8)]
    set_conv_gemm(same, 64, winograd_min_pixels=64)
    same(torch.randn(1, 8, 8, 8))        # the GEMM kernel takes the maps it is given
    set_conv_gemm(same, 0)
    same(torch.randn(1, 8, 8, 8))
    assert calls == [(8, 8)]


def test_winograd_module_matches_native_in_fp32():
    torch.manual_seed(0)
    conv = Conv2d(16, 24, 3, padding=1)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    ref = conv(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *conv.parameters()])
    FastPaths(conv_winograd_min_pixels=1).apply(conv)
    out = conv(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *conv.parameters()])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
