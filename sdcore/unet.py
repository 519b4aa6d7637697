"""The SD2 UNet of the MLPerf reference (LDM ``openaimodel.UNetModel``), re-implemented.

Same architecture, computation order and parameter names as the reference, so its
``model.diffusion_model.*`` tensors load with ``strict=True`` and outputs match in fp32.
The MLPerf change to Stable Diffusion 2 is kept: residual blocks and the output head
normalise with GroupNorm over **16** groups (computed in fp32, like the reference's
``GroupNorm32``), while the spatial transformers keep GroupNorm(32, eps 1e-6).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sdcore.attention import SpatialTransformer, check_attention_backend
from sdcore.conv import Conv2d
from sdcore.linear import Linear

RESBLOCK_NORM_GROUPS = 16


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding as the reference computes it: [cos(t*f), sin(t*f)], fp32."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half
    )
    args = timesteps[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm evaluated in fp32 and cast back to the input dtype (reference behaviour under
    autocast: statistics and affine in fp32, the result rounded once to the low dtype)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(RESBLOCK_NORM_GROUPS, channels)


def zero_init(module: nn.Module) -> nn.Module:
    """The reference's zero_module: start residual branches and the output head at zero."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN-SiLU-conv, + timestep projection, GN-SiLU-dropout-conv(zero init), + skip."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int,
                 use_checkpoint: bool = False):
        super().__init__()
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            normalization(out_channels), nn.SiLU(), nn.Dropout(p=dropout),
            zero_init(Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = Conv2d(channels, out_channels, 1)
        self.use_checkpoint = use_checkpoint

    def _forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        h = self.out_layers(h + emb_out[:, :, None, None])
        return self.skip_connection(x) + h

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._forward, x, emb, use_reentrant=False)
        return self._forward(x, emb)


class Downsample(nn.Module):
    """3x3 convolution with stride 2."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TimestepEmbedSequential(nn.Sequential):
    """Sequential that hands the timestep embedding to ResBlocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


def _require(name: str, value, expected) -> None:
    if value != expected:
        raise ValueError(f"UNetModel: {name}={value!r} is not supported (the SD2 reference uses {expected!r})")


class UNetModel(nn.Module):
    """SD2 UNet taking the reference yaml's ``unet_config.params`` unchanged.

    Accepted for config compatibility without effect: ``image_size`` (unused by the reference
    too) and ``use_fp16`` (the reference only casts the input to fp16 before the first
    convolution, which its fp16 autocast does anyway; precision here is chosen by
    ``sdcore.precision.FastPaths``). Reference options outside the SD2 architecture
    (class conditioning, scale-shift norm, up/down-sampling ResBlocks, legacy attention
    blocks, non-2D convolutions) raise ``ValueError``.
    """

    def __init__(self, image_size: int, in_channels: int, model_channels: int, out_channels: int,
                 num_res_blocks: int, attention_resolutions, dropout: float = 0.0,
                 channel_mult=(1, 2, 4, 8), conv_resample: bool = True, dims: int = 2,
                 num_classes: int | None = None, use_checkpoint: bool = False, use_fp16: bool = False,
                 num_heads: int = -1, num_head_channels: int = -1, use_scale_shift_norm: bool = False,
                 resblock_updown: bool = False, use_spatial_transformer: bool = False,
                 transformer_depth: int = 1, context_dim: int | list[int] | None = None,
                 legacy: bool = True, use_linear_in_transformer: bool = False,
                 attention_backend: str = "math"):
        super().__init__()
        _require("dims", dims, 2)
        _require("num_classes", num_classes, None)
        _require("use_scale_shift_norm", use_scale_shift_norm, False)
        _require("resblock_updown", resblock_updown, False)
        _require("conv_resample", conv_resample, True)
        _require("use_spatial_transformer", use_spatial_transformer, True)
        if context_dim is None:
            raise ValueError("UNetModel: the spatial transformer needs context_dim")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("UNetModel: set num_heads or num_head_channels")
        check_attention_backend(attention_backend)
        self.image_size = image_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.model_channels = model_channels
        context_dim = list(context_dim) if isinstance(context_dim, (list, tuple)) else context_dim

        def resblock(channels: int, out: int) -> ResBlock:
            return ResBlock(channels, time_embed_dim, dropout, out, use_checkpoint)

        def transformer(channels: int) -> SpatialTransformer:
            if num_head_channels == -1:
                heads, dim_head = num_heads, channels // num_heads
            else:
                heads, dim_head = channels // num_head_channels, num_head_channels
            if legacy:
                dim_head = channels // heads
            return SpatialTransformer(channels, heads, dim_head, depth=transformer_depth,
                                      dropout=dropout, context_dim=context_dim,
                                      use_linear=use_linear_in_transformer,
                                      use_checkpoint=use_checkpoint,
                                      attention_backend=attention_backend)

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            Linear(model_channels, time_embed_dim), nn.SiLU(), Linear(time_embed_dim, time_embed_dim)
        )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_channels = [model_channels]
        ch, ds = model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(resblock(ch, ch), transformer(ch), resblock(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [resblock(ch + skip_channels.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch), nn.SiLU(), zero_init(Conv2d(model_channels, out_channels, 3, padding=1))
        )

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        skips = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h.type(x.dtype))
