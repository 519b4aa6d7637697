"""3x3 convolutions as Winograd F(2x2, 3x3) products (a fast path for the larger maps).

Why: a 3x3 convolution takes 36 multiplies per 2x2 block of outputs and channel pair; Winograd's
minimal filtering takes 16, as 16 independent matrix products of the transformed input tiles and
filters (Lavin & Gray 2015, "Fast Algorithms for Convolutional Neural Networks"). Forward and
backward both run on those 16 products, so the whole training step of a convolution does 2.25x
fewer multiply-adds; the transforms are additions over activations of a few MB. On the UNet's
16x16 and 32x32 maps a CPU's native convolution already runs near its matmul peak, so fewer FLOPs
are the only way to a faster step there. The sums are in another order (the transforms' entries
are 0, +-1/2, +-1, so nothing is approximated): in fp32 it agrees with ``F.conv2d`` to a few ulp.
Under autocast the products run in the low dtype and the transforms in fp32, each side rounded
once to the low dtype.

``conv2d_winograd`` takes stride 1, padding 1, no dilation or groups, and even map sides (the
UNet's). The transforms of the input, filters and output are written out with their adjoints,
so the backward is the same additions and 2 x 16 products.
"""

import torch
from torch.autograd.function import once_differentiable

from sdcore.linear import onednn_applies, onednn_gemm

# F(2x2, 3x3): output = A^T [(G g G^T) * (B^T d B)] A for a 4x4 input tile d and a 3x3 filter g,
# with B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
# G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]] and A^T = [[1, 1, 1, 0], [0, 1, -1, -1]],
# each written out below as the additions it stands for.


def _transform_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 for the low-precision dtypes (their sums rounded once, at the end), else ``dtype``."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def _stride2_slices(t: torch.Tensor, dim: int, count: int, size: int) -> list[torch.Tensor]:
    """The ``count`` views of every other entry of ``t`` along ``dim``, starting at 0..count-1, each
    ``size`` entries long: the k-th row (or column) of every tile, tiles 2 apart."""
    return [t.narrow(dim, k, 2 * size - 1)[(slice(None),) * dim + (slice(None, None, 2),)] for k in range(count)]


def _filter_g(taps: torch.Tensor) -> torch.Tensor:
    """G applied along the first dimension: (3, ...) -> (4, ...)."""
    out = taps.new_empty(4, *taps.shape[1:])
    out[0], out[3] = taps[0], taps[2]
    torch.add(taps[0], taps[2], out=out[1]).mul_(0.5)
    torch.sub(out[1], taps[1], alpha=0.5, out=out[2])
    out[1].add_(taps[1], alpha=0.5)
    return out


def _filter_g_adjoint(grads: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """G^T applied to four tensors: -> (3, ...), into ``out`` when given."""
    out = grads[0].new_empty(3, *grads[0].shape) if out is None else out
    torch.add(grads[1], grads[2], out=out[1]).mul_(0.5)
    torch.add(grads[0], out[1], out=out[0])
    torch.add(grads[3], out[1], out=out[2])
    torch.sub(grads[1], grads[2], out=out[1]).mul_(0.5)
    return out


def _filter_tiles(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """G g G^T of every 3x3 filter, (O, C, 3, 3) -> (16, O, C) in ``dtype``, summed in ``_transform_dtype``."""
    # One copy into tap-major order, so every sum below runs over contiguous (O, C) planes.
    taps = weight.permute(3, 2, 0, 1).to(_transform_dtype(weight.dtype), memory_format=torch.contiguous_format)  # (s, r, O, C)
    half = _filter_g(taps)  # (b, r, O, C)
    return _filter_g(half.transpose(0, 1)).to(dtype).view(16, *weight.shape[:2])  # (a, b, O, C)


def _filter_tiles_adjoint(grad_tiles: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The adjoint of ``_filter_tiles``: the 16 filter-tile gradients (each O, C) -> (O, C, 3, 3) in ``dtype``."""
    tdtype = _transform_dtype(grad_tiles[0].dtype)
    grads = [g.to(tdtype) for g in grad_tiles]
    half = grads[0].new_empty(4, 3, *grads[0].shape)  # (a, s, O, C)
    for a in range(4):
        _filter_g_adjoint(grads[4 * a:4 * a + 4], out=half[a])
    taps = _filter_g_adjoint(list(half))  # (r, s, O, C)
    return taps.permute(2, 3, 0, 1).to(dtype, memory_format=torch.contiguous_format)


def _input_tiles(padded: torch.Tensor, th: int, tw: int) -> torch.Tensor:
    """B^T d B of every 4x4 tile (stride 2) of a zero-padded NHWC map: (4, 4, N, th, tw, C)."""
    n, _, wp, c = padded.shape
    rows = _stride2_slices(padded, 1, 4, th)
    half = padded.new_empty(4, n, th, wp, c)
    torch.sub(rows[0], rows[2], out=half[0])
    torch.add(rows[1], rows[2], out=half[1])
    torch.sub(rows[2], rows[1], out=half[2])
    torch.sub(rows[1], rows[3], out=half[3])
    tiles = padded.new_empty(4, 4, n, th, tw, c)
    for a in range(4):
        cols = _stride2_slices(half[a], 2, 4, tw)
        torch.sub(cols[0], cols[2], out=tiles[a, 0])
        torch.add(cols[1], cols[2], out=tiles[a, 1])
        torch.sub(cols[2], cols[1], out=tiles[a, 2])
        torch.sub(cols[1], cols[3], out=tiles[a, 3])
    return tiles


def _input_tiles_adjoint(grad_tiles: list[torch.Tensor], h: int, w: int) -> torch.Tensor:
    """The adjoint of ``_input_tiles``: the 16 tile gradients (each N, th, tw, C; tile a, b at
    4a + b) -> the padded NHWC map's gradient, summed in ``_transform_dtype``."""
    n, th, tw, c = grad_tiles[0].shape
    dtype = _transform_dtype(grad_tiles[0].dtype)
    half = grad_tiles[0].new_zeros(4, n, th, w + 2, c, dtype=dtype)
    for a in range(4):
        g, cols = grad_tiles[4 * a:4 * a + 4], _stride2_slices(half[a], 2, 4, tw)
        cols[0].add_(g[0])
        cols[1].add_(g[1]).sub_(g[2]).add_(g[3])
        cols[2].add_(g[1]).add_(g[2]).sub_(g[0])
        cols[3].sub_(g[3])
    padded = half.new_zeros(n, h + 2, w + 2, c)
    rows = _stride2_slices(padded, 1, 4, th)
    rows[0].add_(half[0])
    rows[1].add_(half[1]).sub_(half[2]).add_(half[3])
    rows[2].add_(half[1]).add_(half[2]).sub_(half[0])
    rows[3].sub_(half[3])
    return padded


def _output_tiles(products: list[torch.Tensor], h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
    """A^T m A of every tile's 16 products (each N, th, tw, O; tile a, b at 4a + b) into the NHWC
    output (N, H, W, O), summed in ``dtype``."""
    n, th, tw, o = products[0].shape
    half = products[0].new_empty(2, 4, n, th, tw, o, dtype=dtype)
    for b in range(4):
        half[0, b].copy_(products[b]).add_(products[4 + b]).add_(products[8 + b])
        half[1, b].copy_(products[4 + b]).sub_(products[8 + b]).sub_(products[12 + b])
    out = half.new_empty(n, h, w, o)
    for p in range(2):
        s = half[p]
        torch.add(s[0], s[1], out=out[:, p::2, 0::2]).add_(s[2])
        torch.sub(s[1], s[2], out=out[:, p::2, 1::2]).sub_(s[3])
    return out


def _output_tiles_adjoint(grad_out: torch.Tensor) -> torch.Tensor:
    """The adjoint of ``_output_tiles``: the NHWC output's gradient -> (4, 4, N, th, tw, O)."""
    n, h, w, o = grad_out.shape
    half = grad_out.new_empty(2, 4, n, h // 2, w // 2, o)
    for p in range(2):
        g0, g1 = grad_out[:, p::2, 0::2], grad_out[:, p::2, 1::2]
        half[p, 0] = g0
        torch.neg(g1, out=half[p, 3])
        torch.add(g0, g1, out=half[p, 1])
        torch.sub(g0, g1, out=half[p, 2])
    grad = grad_out.new_empty(4, 4, n, h // 2, w // 2, o)
    grad[0] = half[0]
    torch.neg(half[1], out=grad[3])
    torch.add(half[0], half[1], out=grad[1])
    torch.sub(half[0], half[1], out=grad[2])
    return grad


def _products(rows: torch.Tensor, filters: torch.Tensor, onednn: bool) -> list[torch.Tensor]:
    """``rows[k] @ filters[k].t()`` for the 16 k: oneDNN's fp32 GEMM one by one with ``onednn``
    (returned as they are: stacking them would copy every product), else one ``torch.bmm``."""
    if onednn:
        return [onednn_gemm(r, f) for r, f in zip(rows, filters)]
    return list(torch.bmm(rows, filters.transpose(1, 2)))


class _WinogradConv(torch.autograd.Function):
    """NCHW map and 3x3 filters -> the convolution's NCHW output, in ``dtype`` and the input's
    memory format. The backward is the adjoint transforms around the 16 products of each gradient."""

    @staticmethod
    def forward(ctx, x, weight, dtype, onednn):
        n, c, h, w = x.shape
        o = weight.shape[0]
        filters = _filter_tiles(weight, dtype)
        ctx.x_dtype, ctx.weight_dtype, ctx.onednn = x.dtype, weight.dtype, onednn
        ctx.layout = (torch.channels_last if x.is_contiguous(memory_format=torch.channels_last)
                      and not x.is_contiguous() else torch.contiguous_format)
        padded = x.new_zeros(n, h + 2, w + 2, c, dtype=_transform_dtype(x.dtype))
        padded[:, 1:h + 1, 1:w + 1] = x.permute(0, 2, 3, 1)
        rows = _input_tiles(padded, h // 2, w // 2).to(filters.dtype).view(16, -1, c)
        ctx.save_for_backward(rows, filters)
        products = [p.view(n, h // 2, w // 2, o) for p in _products(rows, filters, onednn)]
        out = _output_tiles(products, h, w, _transform_dtype(filters.dtype)).permute(0, 3, 1, 2)
        return out.to(filters.dtype, memory_format=ctx.layout)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        rows, filters = ctx.saved_tensors
        n, o, h, w = grad.shape
        c = rows.shape[-1]
        grad = grad.permute(0, 2, 3, 1).to(_transform_dtype(grad.dtype), memory_format=torch.contiguous_format)
        grad_products = _output_tiles_adjoint(grad).to(rows.dtype).view(16, -1, o)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_rows = _products(grad_products, filters.transpose(1, 2), ctx.onednn)
            grad_x = _input_tiles_adjoint([g.view(n, h // 2, w // 2, c) for g in grad_rows], h, w)
            grad_x = grad_x[:, 1:h + 1, 1:w + 1].permute(0, 3, 1, 2).to(ctx.x_dtype, memory_format=ctx.layout)
        if ctx.needs_input_grad[1]:
            grad_filters = _products(grad_products.transpose(1, 2), rows.transpose(1, 2), ctx.onednn)
            grad_weight = _filter_tiles_adjoint(grad_filters, ctx.weight_dtype)
        return grad_x, grad_weight, None, None


def conv2d_winograd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    onednn: bool = False) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, padding=1)`` for a 3x3 ``weight`` and even map sides, as
    Winograd F(2x2, 3x3). The result has the input's memory format. Under autocast the products
    run in the autocast dtype; with ``onednn``, an fp32 call runs them on oneDNN's GEMM."""
    device_type = x.device.type
    dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype
    out = _WinogradConv.apply(x, weight, dtype, onednn and onednn_applies(x, weight))
    return out if bias is None else out + bias.to(out.dtype).view(1, -1, 1, 1)


def winograd_applies(conv: torch.nn.Conv2d, x: torch.Tensor) -> bool:
    """Whether ``conv`` on ``x`` is a call ``conv2d_winograd`` computes: 3x3, stride 1, padding 1,
    zero padding, no dilation or groups, even map sides."""
    return (x.dim() == 4 and conv.kernel_size == (3, 3) and conv.stride == (1, 1) and conv.padding == (1, 1)
            and conv.dilation == (1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0)
