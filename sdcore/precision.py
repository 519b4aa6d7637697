"""Fast-path switches for the UNet: attention kernel, channels-last, autocast, GEMM convolutions
on small maps, torch.compile.

Faithful fp32 eager (the defaults) is what the golden tests check; each switch is an option
the trainer and evaluator turn on from config and that tests compare against fp32 eager.
"""

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from sdcore.attention import check_attention_backend, set_attention_backend
from sdcore.conv import set_conv_gemm

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# train.precision / eval precision names -> autocast setting
PRECISION_TO_AUTOCAST = {"fp32": None, "bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class FastPaths:
    attention: str = "math"        # "math" (reference fp32 softmax) | "sdpa"
    channels_last: bool = False
    autocast: str | None = None    # None | "bf16" | "fp16"
    compile: bool = False
    conv_gemm_max_pixels: int = 0  # 0 | maps of at most this many pixels convolve as one GEMM

    def __post_init__(self):
        check_attention_backend(self.attention)
        if self.conv_gemm_max_pixels < 0:
            raise ValueError(f"conv_gemm_max_pixels must be >= 0, got {self.conv_gemm_max_pixels}")
        if self.autocast is not None and self.autocast not in AUTOCAST_DTYPES:
            raise ValueError(f"autocast must be None or one of {sorted(AUTOCAST_DTYPES)}, got {self.autocast!r}")

    @classmethod
    def from_config(cls, fast_paths: dict, precision: str = "fp32") -> "FastPaths":
        """Build from a config's ``fast_paths`` block and a precision name (fp32 | bf16 | fp16)."""
        if precision not in PRECISION_TO_AUTOCAST:
            raise ValueError(f"precision must be one of {sorted(PRECISION_TO_AUTOCAST)}, got {precision!r}")
        return cls(autocast=PRECISION_TO_AUTOCAST[precision], **fast_paths)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AUTOCAST_DTYPES.get(self.autocast)

    def apply(self, model: nn.Module) -> nn.Module:
        """Set the attention and convolution kernels, memory format and compilation; returns the
        model to call.

        With ``compile`` the returned object is the compiled wrapper: keep the original module
        for ``state_dict`` and the optimizer (they share parameters).
        """
        set_attention_backend(model, self.attention)
        set_conv_gemm(model, self.conv_gemm_max_pixels)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.compile:
            model = torch.compile(model)
        return model

    def autocast_context(self, device_type: str | torch.device):
        """Autocast region for the forward pass (a no-op context in fp32)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        device_type = torch.device(device_type).type
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)
