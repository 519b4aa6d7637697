"""The GEMM convolution fast path (sdcore.conv) against F.conv2d, and when it applies."""

import pytest
import torch

import sdcore.conv
from sdcore.conv import Conv2d, conv2d_gemm, set_conv_gemm
from sdcore.precision import FastPaths
from sdcore.unet import UNetModel


@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_gemm_matches_conv2d_fp32(kernel, bias, channels_last):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(24, 40, kernel, padding=kernel // 2, bias=bias)
    x = torch.randn(3, 24, 5, 7, requires_grad=True)
    if channels_last:
        conv = conv.to(memory_format=torch.channels_last)
    inp = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    ref = conv(inp)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *conv.parameters()])
    out = conv2d_gemm(inp, conv.weight, conv.bias)
    grads = torch.autograd.grad(out.square().sum(), [x, *conv.parameters()])
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
