"""The oneDNN linear fast path (sdcore.linear) against F.linear, and where it applies."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from sdcore.linear import Linear, linear_onednn, set_linear_onednn
from sdcore.precision import FastPaths
from sdcore.unet import UNetModel


class _AtenOps(TorchDispatchMode):
    """Records the names of the aten ops that run."""

    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(37, 24), (3, 11, 24), (2, 3, 5, 24)], ids=["2d", "3d", "4d"])
def test_onednn_matches_linear_fp32(shape, bias):
    torch.manual_seed(0)
    linear = torch.nn.Linear(24, 40, bias=bias)
    x = torch.randn(*shape, requires_grad=True)
    ref = linear(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, *linear.parameters()])
    out = linear_onednn(x, linear.weight, linear.bias)
    grads = torch.autograd.grad(out.square().sum(), [x, *linear.parameters()])
    assert out.shape == ref.shape and out.is_contiguous()  # callers view the result
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, ref_grads):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)


def test_onednn_runs_no_blas_gemm_forward_or_backward():
    """The switch reaches the kernels: with it, a Linear's forward and backward are oneDNN GEMMs
    and no BLAS matmul; without it, no oneDNN GEMM."""
    linear, x = Linear(24, 40), torch.randn(3, 11, 24, requires_grad=True)
    for onednn, present, absent in [(True, {"_linear_pointwise"}, {"mm", "addmm", "bmm", "convolution"}),
                                    (False, {"addmm"}, {"_linear_pointwise"})]:
        linear.onednn = onednn
        ops = _AtenOps()
        with ops:
            linear(x).square().sum().backward()
        assert present <= ops.names and not absent & ops.names, (onednn, ops.names)


def test_onednn_applies_to_fp32_cpu_calls_only():
    torch.manual_seed(0)
    linear, x = Linear(24, 40), torch.randn(5, 24)
    linear.onednn = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = linear(x)
        ref = F.linear(x, linear.weight, linear.bias)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, ref, atol=0, rtol=0)  # autocast's own (oneDNN) bf16 matmul, untouched
    float64 = Linear(24, 40).double()
    float64.onednn = True
    ops = _AtenOps()
    with ops:
        float64(x.double())
    assert "_linear_pointwise" not in ops.names


def test_set_linear_onednn_reaches_every_unet_linear(reference):
    config = reference.golden("unet")["config"]
    model = UNetModel(**config)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, Linear) for m in linears)
    assert set_linear_onednn(model, True) == len(linears)
    FastPaths().apply(model)
    assert not any(m.onednn for m in linears)
    FastPaths(onednn_linear=True).apply(model)
    assert all(m.onednn for m in linears)
