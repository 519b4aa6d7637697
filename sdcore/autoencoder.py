"""AutoencoderKL of latent diffusion: the frozen VAE that maps images to 4-channel latents and back.

Module and parameter names follow the reference (``first_stage_model.*`` in an SD checkpoint minus that
prefix), so Stability AI's weights load strictly. The training loss module of the reference is not part of the
checkpoint and is not built here.
"""

import torch
import torch.nn.functional as F
from torch import nn

SCALE_FACTOR = 0.18215
LOGVAR_RANGE = (-30.0, 20.0)


def group_norm(channels: int) -> nn.GroupNorm:
    """The VAE normalises with 32 groups and eps 1e-6 everywhere (unlike the UNet's residual blocks)."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """Two norm-SiLU-conv stages with a residual path; a 1x1 ``nin_shortcut`` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        shortcut = self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x
        return shortcut + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1 convolutions as the q/k/v/out projections."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = group_norm(channels)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, height, width = h.shape
        q = self.q(h).reshape(b, c, height * width).transpose(1, 2)  # (b, hw, c)
        k = self.k(h).reshape(b, c, height * width)  # (b, c, hw)
        v = self.v(h).reshape(b, c, height * width)  # (b, c, hw)
        weights = torch.softmax(torch.bmm(q, k) * c**-0.5, dim=2)  # (b, hw_query, hw_key)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, height, width)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 convolution after padding one pixel on the right and bottom only, as the reference does."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class MidBlock(nn.Module):
    """ResnetBlock - AttnBlock - ResnetBlock at the lowest resolution (always present, whatever attn_resolutions says)."""

    def __init__(self, channels: int, dropout: float):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, dropout)
        self.attn_1 = AttnBlock(channels)
        self.block_2 = ResnetBlock(channels, channels, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Level(nn.Module):
    """One resolution level: ``block`` and ``attn`` lists plus an optional resampler (reference names)."""

    def __init__(self, blocks: list, attns: list, resample: nn.Module | None, resample_name: str):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)
        if resample is not None:
            setattr(self, resample_name, resample)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            x = block(x)
            if self.attn:
                x = self.attn[i](x)
        return x


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> moments parameters (B, 2*z_channels, H/f, W/f) with f = 2**(len(ch_mult)-1)."""

    def __init__(self, *, ch, ch_mult, num_res_blocks, attn_resolutions, in_channels, resolution, z_channels,
                 double_z=True, dropout=0.0, **_ignored):
        super().__init__()
        in_ch_mult = (1,) + tuple(ch_mult)
        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, padding=1)
        current_resolution = resolution
        levels = []
        for level, mult in enumerate(ch_mult):
            block_in, block_out = ch * in_ch_mult[level], ch * mult
            blocks, attns = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if current_resolution in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            is_last = level == len(ch_mult) - 1
            levels.append(Level(blocks, attns, None if is_last else Downsample(block_in), "downsample"))
            if not is_last:
                current_resolution //= 2
        self.down = nn.ModuleList(levels)
        self.mid = MidBlock(block_in, dropout)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels, kernel_size=3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = level(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, out_ch, h*f, w*f); ``up`` is indexed like the encoder's ``down``."""

    def __init__(self, *, ch, out_ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels,
                 dropout=0.0, **_ignored):
        super().__init__()
        block_in = ch * ch_mult[-1]
        current_resolution = resolution // 2 ** (len(ch_mult) - 1)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, padding=1)
        self.mid = MidBlock(block_in, dropout)
        levels = []
        for level in reversed(range(len(ch_mult))):
            block_out = ch * ch_mult[level]
            blocks, attns = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, block_out, dropout))
                block_in = block_out
                if current_resolution in attn_resolutions:
                    attns.append(AttnBlock(block_in))
            levels.insert(0, Level(blocks, attns, Upsample(block_in) if level != 0 else None, "upsample"))
            if level != 0:
                current_resolution *= 2
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = level(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """The frozen first stage: ``moments`` for latent encoding, ``decode``/``decode_latents`` for evaluation."""

    def __init__(self, ddconfig: dict, embed_dim: int, scale_factor: float = SCALE_FACTOR):
        super().__init__()
        if not ddconfig["double_z"]:
            raise ValueError("AutoencoderKL needs double_z=True: its encoder predicts a mean and a log-variance")
        self.scale_factor = scale_factor
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        self.quant_conv = nn.Conv2d(2 * ddconfig["z_channels"], 2 * embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], kernel_size=1)

    def moments(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 2*embed_dim, h, w): mean then log-variance, what the latent shards store."""
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latent to image in roughly [-1, 1]."""
        return self.decoder(self.post_quant_conv(z))

    def decode_latents(self, z_scaled: torch.Tensor) -> torch.Tensor:
        """Diffusion-space latent (already multiplied by scale_factor) to image."""
        return self.decode(z_scaled / self.scale_factor)


def sample_from_moments(moments: torch.Tensor, scale_factor: float = SCALE_FACTOR,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw a diffusion-space latent from stored moments: (mean + std * N(0,1)) * scale_factor.

    The log-variance is clamped to [-30, 20] like the reference's DiagonalGaussianDistribution.
    """
    mean, logvar = torch.chunk(moments, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, *LOGVAR_RANGE))
    noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
    return (mean + std * noise) * scale_factor
