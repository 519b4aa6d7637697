"""Linear layers of the UNet, with an optional oneDNN GEMM for fp32 on a CPU (a fast path).

Why: PyTorch's fp32 matmul on a CPU is MKL's sgemm, and on AMD EPYCs MKL takes its AVX2 code
path even where the CPU has AVX-512: measured on an EPYC with AVX-512 (2 cores), 183-199 GFLOP/s
for the UNet's linear layers forward + backward, against 363-414 GFLOP/s for oneDNN's AVX-512
GEMM (``mkldnn::_linear_pointwise`` on the plain weight, the kernel inductor's CPU backend calls)
running the same three products. The sums are in another order, so in fp32 it agrees with
``F.linear`` to rounding. Under autocast the low-precision matmul is oneDNN's already, so the
switch applies to fp32 only; under torch.compile it gives way to inductor's own GEMMs. It pays
off at the full-size UNet's widths (hundreds of channels); at the demo's few dozen, set-up costs
more than MKL's small GEMMs (sampling at demo scale measured 0.91x of diffusers with an earlier
oneDNN path, 1.19x without).

``Linear`` is ``nn.Linear`` (same parameters and state_dict names) with one switch, ``onednn``.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable


def onednn_gemm(a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b.t() (+ bias)`` for 2-d fp32 ``a`` and ``b`` of any strides, as one oneDNN GEMM."""
    return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """``rows @ weight.t() + bias`` and the two products of its backward, each a oneDNN GEMM."""

    @staticmethod
    def forward(ctx, rows, weight, bias):
        ctx.save_for_backward(rows, weight)
        ctx.has_bias = bias is not None
        return onednn_gemm(rows, weight, bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        rows, weight = ctx.saved_tensors
        grad = grad.contiguous()  # a loss's expanded gradient has zero strides
        grad_rows = onednn_gemm(grad, weight.t()) if ctx.needs_input_grad[0] else None
        grad_weight = onednn_gemm(grad.t(), rows.t()) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_rows, grad_weight, grad_bias


def onednn_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a product of ``x`` and ``weight`` is one the oneDNN path takes: fp32 on a CPU, no autocast."""
    return (x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"
            and not torch.is_autocast_enabled("cpu"))


def linear_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for fp32 on a CPU, forward and backward on oneDNN's GEMM
    (``F.linear`` itself while torch.compile traces: inductor cannot lower the op on a weight
    that changes)."""
    if torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    out = _OneDNNLinear.apply(x.reshape(-1, x.shape[-1]), weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` that runs fp32 CPU calls through ``linear_onednn`` when ``onednn`` is set."""

    onednn: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn and onednn_applies(x, self.weight):
            return linear_onednn(x, self.weight, self.bias)
        return super().forward(x)


def set_linear_onednn(model: nn.Module, enabled: bool) -> int:
    """Set ``onednn`` on every ``Linear`` inside ``model``; returns how many were set."""
    linears = [module for module in model.modules() if isinstance(module, Linear)]
    for linear in linears:
        linear.onednn = enabled
    return len(linears)
