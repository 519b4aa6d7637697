"""Convolutions of the UNet, with an optional GEMM kernel for small feature maps (a fast path).

Why: on this CPU, oneDNN's bf16 convolution backward on the UNet's lowest levels (1280 to 2560
channels on 4x4 and 8x8 maps at a 32x32 latent) runs at 24-50 GFLOP/s, while the same sums as one
matrix product (im2col, then GEMM with the bias added in the GEMM) run 3-6x faster, forward and
backward. It computes the same convolution with the sums in a different order: in fp32 the two
agree to rounding, under autocast both round once to the low dtype. On GPUs leave it off (cuDNN
picks its own algorithms).

``Conv2d`` is ``nn.Conv2d`` (same parameters and state_dict names) with four switches:
``gemm_max_pixels``: a stride-1, "same"-padded, ungrouped call on a map of at most that many
pixels (H x W) takes the GEMM kernel; 0 (the default) keeps every call on ``F.conv2d``;
``winograd_min_pixels`` and ``winograd4_min_pixels``: a 3x3 call that ``sdcore.winograd.winograd_applies``
to, on a map of at least that many pixels, runs as Winograd F(2x2, 3x3) or F(4x4, 3x3)
(``conv2d_winograd``; F(4x4, 3x3) first where both apply; 0, the default: never);
and ``gemm_onednn``: in fp32 on a CPU, the GEMM and the Winograd products are oneDNN's
(``sdcore.linear.linear_onednn``, the ``onednn_linear`` fast path) instead of MKL's sgemm, which
runs AVX2 code on AMD EPYCs.

Under autocast the module also keeps the memory of its low-precision weight gradient across
steps (``WeightGradBuffer``): at these levels that gradient is 29-59 MB of bf16 per layer, and a
fresh allocation of it page-faults on every step (measured on a 4x4 map: 4x slower than the
product itself).
"""

import torch
import torch.nn.functional as F
from torch import nn

from sdcore.linear import linear_onednn, onednn_applies
from sdcore.winograd import FilterTileCache, conv2d_winograd, winograd_applies


class WeightGradBuffer:
    """Memory for one layer's weight gradient, lent to one pending backward at a time.

    A forward borrows it; its backward writes the gradient into it and gives it back. So a second
    use of the layer before that backward (a layer called twice in one graph) finds nothing to
    borrow and its backward allocates, and a lent buffer is never written twice.
    """

    def __init__(self):
        self._buffer: torch.Tensor | None = None

    def borrow(self) -> torch.Tensor | None:
        buffer, self._buffer = self._buffer, None
        return buffer

    def give_back(self, buffer: torch.Tensor) -> None:
        self._buffer = buffer


class _GemmProduct(torch.autograd.Function):
    """``cols @ weight.t() (+ bias)``, the products autograd's addmm backward computes, with the
    weight gradient written into a ``WeightGradBuffer``'s memory."""

    @staticmethod
    def forward(ctx, cols, weight, bias, weight_grad: WeightGradBuffer):
        ctx.save_for_backward(cols, weight)
        ctx.has_bias = bias is not None
        ctx.weight_grad = weight_grad
        ctx.buffer = weight_grad.borrow() if ctx.needs_input_grad[1] else None
        return cols @ weight.t() if bias is None else torch.addmm(bias, cols, weight.t())

    @staticmethod
    def backward(ctx, grad):
        cols, weight = ctx.saved_tensors
        grad_cols = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad_bias = None
        if ctx.needs_input_grad[1]:
            buffer, ctx.buffer = ctx.buffer, None
            if buffer is None or buffer.shape != weight.shape or buffer.dtype != grad.dtype:
                buffer = torch.empty(weight.shape, dtype=grad.dtype, device=grad.device)
            grad_weight = torch.mm(grad.t(), cols, out=buffer)
            ctx.weight_grad.give_back(buffer)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum(0)
        return grad_cols, grad_weight, grad_bias, None


def conv2d_gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                weight_grad: WeightGradBuffer | None = None, onednn: bool = False) -> torch.Tensor:
    """Stride-1 convolution with padding kernel // 2, as im2col + one GEMM.

    Returns (N, C_out, H, W) in the input's memory format: channels-last for a channels-last input
    (the GEMM's rows are pixels, so that is a view), contiguous otherwise. With ``weight_grad``, a
    weight that is not a leaf (a cast of the parameter, whose backward copies its gradient
    elsewhere) gets its gradient in that kept memory; a leaf's gradient becomes ``.grad`` itself,
    so it is never written into memory that is reused. With ``onednn``, an fp32 call (no autocast)
    runs its products on oneDNN's GEMM.
    """
    n, _, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Cast once here, as autocast would for the convolution: the unfolded copy is then made
        # in the low dtype and addmm below finds nothing to cast.
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    if kh == kw == 1:
        cols = x.permute(0, 2, 3, 1).reshape(n * h * w, -1)
    else:
        cols = F.unfold(x, (kh, kw), padding=(kh // 2, kw // 2))  # (N, C_in*kh*kw, H*W)
        cols = cols.transpose(1, 2).reshape(n * h * w, -1)
    # (C_out, C_in, kh, kw) -> (C_in*kh*kw, C_out), the order F.unfold lays out a patch in.
    if weight_grad is not None and not torch.compiler.is_compiling() and weight.grad_fn is not None:
        out = _GemmProduct.apply(cols, weight.reshape(c_out, -1), bias, weight_grad)
    elif onednn and onednn_applies(cols, weight):
        out = linear_onednn(cols, weight.reshape(c_out, -1), bias)
    else:
        weight_matrix = weight.reshape(c_out, -1).t()
        out = cols @ weight_matrix if bias is None else torch.addmm(bias, cols, weight_matrix)
    out = out.view(n, h, w, c_out).permute(0, 3, 1, 2)
    if not channels_last:
        # Back to the input's layout (a copy of a small map): a channels-last result would make the
        # next oneDNN convolution channels-last against contiguous weights, and oneDNN then re-lays
        # the weight out on every call (a 59 MB copy for the 1280-channel 3x3 weights).
        out = out.contiguous()
    return out


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` that runs small maps through ``conv2d_gemm`` when ``gemm_max_pixels`` > 0 and
    large ones through ``conv2d_winograd`` when ``winograd4_min_pixels`` or ``winograd_min_pixels``
    is > 0 (the products on oneDNN's GEMM in fp32 when ``gemm_onednn`` is set). With a
    ``winograd_filters`` cache (set while sampling), calls without a weight gradient reuse the
    transformed filters."""

    gemm_max_pixels: int = 0
    winograd_min_pixels: int = 0
    winograd4_min_pixels: int = 0
    gemm_onednn: bool = False
    winograd_filters: FilterTileCache | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.kept_weight_grad = WeightGradBuffer()

    def _gemm_applies(self, x: torch.Tensor) -> bool:
        kh, kw = self.kernel_size
        return (x.dim() == 4 and 0 < x.shape[-2] * x.shape[-1] <= self.gemm_max_pixels
                and self.stride == (1, 1) and self.dilation == (1, 1) and self.groups == 1
                and kh % 2 == 1 and kw % 2 == 1 and self.padding == (kh // 2, kw // 2)
                and self.padding_mode == "zeros")

    def _winograd_tile(self, x: torch.Tensor) -> int:
        """The Winograd output tile (4 or 2) this call runs with, 0 for none. Never under
        torch.compile: inductor makes its own kernels of the native convolution."""
        if not (self.winograd4_min_pixels or self.winograd_min_pixels) or torch.compiler.is_compiling():
            return 0  # the faithful default: nothing more to check on every call
        pixels = x.shape[-2] * x.shape[-1] if x.dim() == 4 else 0
        for m, min_pixels in ((4, self.winograd4_min_pixels), (2, self.winograd_min_pixels)):
            if min_pixels and pixels >= min_pixels and winograd_applies(self, x, m):
                return m
        return 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gemm_max_pixels and self._gemm_applies(x):
            return conv2d_gemm(x, self.weight, self.bias, self.kept_weight_grad, self.gemm_onednn)
        if m := self._winograd_tile(x):
            return conv2d_winograd(x, self.weight, self.bias, self.gemm_onednn, m, self.winograd_filters)
        return super().forward(x)


def set_conv_gemm(model: nn.Module, max_pixels: int, onednn: bool = False, winograd_min_pixels: int = 0,
                  winograd4_min_pixels: int = 0) -> int:
    """Set ``gemm_max_pixels``, ``gemm_onednn``, ``winograd_min_pixels`` and ``winograd4_min_pixels``
    on every ``Conv2d`` inside ``model``; returns how many were set."""
    convs = [module for module in model.modules() if isinstance(module, Conv2d)]
    for conv in convs:
        conv.gemm_max_pixels, conv.gemm_onednn = max_pixels, onednn
        conv.winograd_min_pixels, conv.winograd4_min_pixels = winograd_min_pixels, winograd4_min_pixels
    return len(convs)
