"""Spatial transformer of the SD2 UNet: cross-attention, GEGLU feed-forward, transformer block.

Module and parameter names follow the reference (``ldm.modules.attention``) so that its
state_dict loads unchanged: ``norm, proj_in, transformer_blocks.N.{attn1,ff,attn2,norm1..3},
proj_out`` with ``to_q/to_k/to_v/to_out.0`` in every attention and ``ff.net.0.proj / ff.net.2``.

Three numerically equivalent attention kernels are selectable per module (``attention_backend``):
``"math"`` is the reference's default ``ATTN_PRECISION=fp32`` path (QK^T and softmax in fp32 even
under autocast, the product with V at the autocast dtype); ``"sdpa"`` is
``torch.nn.functional.scaled_dot_product_attention`` (fused, no materialised score matrix), except
where its CPU backward is the slow one (``_sdpa_attention``); ``"onednn"`` is the math kernel's
sums for fp32 on a CPU with each head's two products on oneDNN's GEMM (``_OneDNNAttention``), and
``"sdpa"`` elsewhere (other dtypes, devices, short sequences, torch.compile).
"""

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint

from sdcore.linear import Linear, onednn_applies, onednn_gemm

ATTENTION_BACKENDS = ("math", "sdpa", "onednn")


def check_attention_backend(backend: str) -> str:
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
    return backend


def set_attention_backend(model: nn.Module, backend: str) -> int:
    """Switch every CrossAttention inside ``model``; returns how many were switched."""
    check_attention_backend(backend)
    switched = 0
    for module in model.modules():
        if isinstance(module, CrossAttention):
            module.attention_backend = backend
            switched += 1
    return switched


def _math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v on (B, heads, N, d) tensors, scores in fp32 like the reference.

    The reference disables autocast around q k^T and upcasts q, k; the product with v then runs
    under the active autocast again, which casts the fp32 probabilities to v's low dtype: the
    explicit cast here does the same and also covers a model run in half precision.
    """
    device_type = q.device.type
    no_autocast = (torch.autocast(device_type=device_type, enabled=False)
                   if torch.amp.is_autocast_available(device_type) else contextlib.nullcontext())
    with no_autocast:
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    probs = scores.softmax(dim=-1)
    return torch.matmul(probs.to(v.dtype), v)


# The fused CPU kernel's backward in bf16/fp16 costs about 15 ms a call whatever the size (2-core
# Xeon, batch 4, 64-d heads: 18.5 ms against 2.8 ms for the math kernel's at 64 queries, on par at
# 256, 2x faster at 1024), so shorter sequences that will be differentiated take the math kernel.
CPU_LOW_PRECISION_FUSED_BACKWARD_MIN_QUERIES = 512


def _sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """The fused kernel. Low-precision CPU attention under autograd: short sequences on the math
    kernel, longer ones with contiguous heads (the fused bf16 backward at 1024 queries runs 1.5x
    faster on them than on the strided views of ``_split_heads``)."""
    if q.device.type == "cpu" and q.dtype != torch.float32 and torch.is_grad_enabled() and q.requires_grad:
        if q.shape[-2] < CPU_LOW_PRECISION_FUSED_BACKWARD_MIN_QUERIES:
            return _math_attention(q, k, v, scale)
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


# Shorter sequences stay on the fused kernel: at 256 queries oneDNN's GEMMs gain nothing (batch 4,
# 10 heads, forward + backward: 14.2 ms against 13.7), from 1024 they gain 1.6-1.9x.
ONEDNN_ATTENTION_MIN_QUERIES = 1024
# Without a backward, ``_OneDNNAttention`` makes a head's scores in blocks of this many queries:
# a 4096-token head's whole score matrix is 64 MB, a block of 1024 rows a quarter of it.
ONEDNN_ATTENTION_QUERY_BLOCK = 1024


class _OneDNNAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v for fp32 (B, heads, N, d) CPU tensors, every product one oneDNN GEMM
    per head.

    Why: on AMD EPYCs the fused CPU kernel (``F.scaled_dot_product_attention``) runs at ~190
    GFLOP/s in fp32 and the math kernel's ``torch.matmul`` (MKL's AVX2 code there) at ~145, while
    oneDNN's GEMM runs the same products at ~300 (a 4096-token level of a 64x64 latent: 222 ms
    fused, 139 ms here). The sums are the math kernel's: fp32 scores, a full softmax over each row
    (q is scaled before its product, by 1/8 for the UNet's 64-wide heads: exactly).
    oneDNN is fast only on a dense first operand and a dense (either order) second one, so the heads
    are copied out of the interleaved projections first (N x d each, against N x N products), and
    the products whose natural first operand is a transpose are computed transposed. The
    probabilities are kept for the backward only when one will run.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, keep):
        b, heads, n, d = q.shape
        block = n if keep else ONEDNN_ATTENTION_QUERY_BLOCK
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out = q.new_empty(b, n, heads, d)
        probs = []
        for i in range(b):
            for j in range(heads):
                for start in range(0, n, block):
                    p = onednn_gemm(q[i, j, start:start + block] * scale, k[i, j]).softmax(-1)
                    out[i, start:start + block, j] = onednn_gemm(p, v[i, j].t())
                    if keep:
                        probs.append(p)
        out = out.transpose(1, 2)
        if keep:
            ctx.save_for_backward(q, k, v, out)
            ctx.probs, ctx.scale = probs, scale
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        q, k, v, out = ctx.saved_tensors
        b, heads, n, d = q.shape
        grad = grad.contiguous()
        grad_q, grad_k, grad_v = (t.new_empty(b, t.shape[2], heads, d) for t in (q, k, v))
        for index, (i, j) in enumerate((i, j) for i in range(b) for j in range(heads)):
            p, g = ctx.probs[index], grad[i, j]
            grad_v[i, :, j] = onednn_gemm(g.t().contiguous(), p.t()).t()            # (dO^T P)^T = P^T dO
            grad_s = onednn_gemm(g, v[i, j])                                       # dO V^T, then
            grad_s.sub_((g * out[i, j]).sum(-1, keepdim=True)).mul_(p)             # the softmax's adjoint
            grad_q[i, :, j] = onednn_gemm(grad_s, k[i, j].t()).mul_(ctx.scale)     # dS K
            grad_k[i, :, j] = onednn_gemm(q[i, j].t().contiguous(), grad_s.t()).t().mul_(ctx.scale)  # dS^T Q
        ctx.probs = None
        return grad_q.transpose(1, 2), grad_k.transpose(1, 2), grad_v.transpose(1, 2), None, None


def _onednn_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``_OneDNNAttention`` for fp32 on a CPU outside torch.compile, from ``ONEDNN_ATTENTION_MIN_QUERIES``
    queries; else the fused kernel."""
    if (q.shape[-2] >= ONEDNN_ATTENTION_MIN_QUERIES and onednn_applies(q, k) and v.dtype == torch.float32
            and not torch.compiler.is_compiling()):
        keep = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))  # a backward will run
        return _OneDNNAttention.apply(q, k, v, scale, keep)
    return _sdpa_attention(q, k, v, scale)


class CrossAttention(nn.Module):
    """Multi-head attention; self-attention when no context is given."""

    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8,
                 dim_head: int = 64, dropout: float = 0.0, attention_backend: str = "math"):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.dim_head = dim_head
        self.scale = dim_head ** -0.5
        self.attention_backend = check_attention_backend(attention_backend)
        self.to_q = Linear(query_dim, inner_dim, bias=False)
        self.to_k = Linear(context_dim, inner_dim, bias=False)
        self.to_v = Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        # (B, N, heads*d) -> (B, heads, N, d) as a strided view: no copy.
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q = self._split_heads(self.to_q(x))
        k = self._split_heads(self.to_k(context))
        v = self._split_heads(self.to_v(context))
        if self.attention_backend == "sdpa":
            out = _sdpa_attention(q, k, v, self.scale)
        elif self.attention_backend == "onednn":
            out = _onednn_attention(q, k, v, self.scale)
        else:
            out = _math_attention(q, k, v, self.scale)
        b, _, n, _ = out.shape
        out = out.transpose(1, 2).reshape(b, n, self.heads * self.dim_head)
        return self.to_out(out)


class GEGLU(nn.Module):
    """Linear to 2*dim_out, split into value and gate, value * GELU(gate) (exact erf GELU)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward with a 4x hidden width (the reference's gated_ff=True)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        inner_dim = dim * mult
        self.net = nn.Sequential(GEGLU(dim, inner_dim), nn.Dropout(dropout), Linear(inner_dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention on the context, GEGLU feed-forward."""

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0,
                 context_dim: int | None = None, use_checkpoint: bool = False,
                 attention_backend: str = "math"):
        super().__init__()
        # Registration order = reference order, so state_dict keys enumerate identically.
        self.attn1 = CrossAttention(dim, None, n_heads, d_head, dropout, attention_backend)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(dim, context_dim, n_heads, d_head, dropout, attention_backend)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.use_checkpoint = use_checkpoint

    def _forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, context, use_reentrant=False)
        return self._forward(x, context)


class SpatialTransformer(nn.Module):
    """GroupNorm(32, eps 1e-6) -> proj_in -> transformer blocks over H*W tokens -> proj_out, + input.

    With linear projections the (B, C, H, W) map is flattened to tokens (B, H*W, C) by a permute:
    free for channels-last inputs. The result goes back in the input's memory format: for a
    channels-last input as a permuted view (no copy), otherwise contiguous, as the reference's
    ``.contiguous()``; values are identical either way.
    """

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1,
                 dropout: float = 0.0, context_dim: int | list[int] | None = None,
                 use_linear: bool = False, use_checkpoint: bool = False,
                 attention_backend: str = "math"):
        super().__init__()
        inner_dim = n_heads * d_head
        if not isinstance(context_dim, (list, tuple)):
            context_dim = [context_dim] * depth
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)
        if use_linear:
            self.proj_in = Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout, context_dim[d],
                                  use_checkpoint, attention_backend)
            for d in range(depth)
        )
        if use_linear:
            self.proj_out = Linear(inner_dim, in_channels)
        else:
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        # The reference zero-initialises proj_out (each transformer starts as the identity).
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor | list[torch.Tensor] | None = None) -> torch.Tensor:
        if not isinstance(context, (list, tuple)):
            context = [context] * len(self.transformer_blocks)
        b, c, h, w = x.shape
        x_in = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        tokens = x.permute(0, 2, 3, 1).reshape(b, h * w, x.shape[1])
        if self.use_linear:
            tokens = self.proj_in(tokens)
        for block, block_context in zip(self.transformer_blocks, context):
            tokens = block(tokens, context=block_context)
        if self.use_linear:
            tokens = self.proj_out(tokens)
        x = tokens.view(b, h, w, tokens.shape[-1]).permute(0, 3, 1, 2)
        if not x_in.is_contiguous(memory_format=torch.channels_last):
            # Back to the input's layout, as the reference's .contiguous(): a channels-last view added
            # to a contiguous input would make the sum, and so every convolution after it, channels-last
            # against contiguous weights, and oneDNN then re-lays each weight out on every call.
            x = x.contiguous()
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in
