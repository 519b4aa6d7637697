"""Fast-path switches for the UNet: attention kernel, channels-last, autocast, persistent weight
casts, GEMM convolutions on small maps, torch.compile.

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
    persistent_weight_casts: bool = False  # with autocast: weight casts into buffers kept across steps

    def __post_init__(self):
        check_attention_backend(self.attention)
        if self.conv_gemm_max_pixels < 0:
            raise ValueError(f"conv_gemm_max_pixels must be >= 0, got {self.conv_gemm_max_pixels}")
        if self.persistent_weight_casts and self.autocast is None:
            raise ValueError("persistent_weight_casts needs autocast (precision bf16 or fp16)")
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

        With ``persistent_weight_casts`` or ``compile`` the returned object is a wrapper: keep the
        original module for ``state_dict`` and the optimizer (they share parameters).
        """
        set_attention_backend(model, self.attention)
        set_conv_gemm(model, self.conv_gemm_max_pixels)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.persistent_weight_casts:
            model = PersistentWeightCasts(model, self.autocast_dtype)
        if self.compile:
            model = torch.compile(model)
        return model

    @property
    def grads_set_to_none(self) -> bool:
        """What ``zero_grad(set_to_none=...)`` should be: persistent casts accumulate into
        gradients that stay allocated."""
        return not self.persistent_weight_casts

    def autocast_context(self, device_type: str | torch.device):
        """Autocast region for the forward pass (a no-op context in fp32)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        device_type = torch.device(device_type).type
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)


class _CastInto(torch.autograd.Function):
    """``weight`` cast into the preallocated ``low`` buffer; the gradient comes back through the
    preallocated fp32 ``grad_buffer``, so no step allocates (and page-faults) weight-sized memory."""

    @staticmethod
    def forward(ctx, weight, low, grad_buffer):
        ctx.grad_buffer = grad_buffer
        # Through .data: refilling the buffer with the same weights (a second forward before
        # backward) must not look like an in-place change to the tensors autograd saved.
        low.data.copy_(weight)
        return low.detach()

    @staticmethod
    def backward(ctx, grad):
        return ctx.grad_buffer.copy_(grad), None, None


class PersistentWeightCasts(nn.Module):
    """Runs ``module`` with its Linear and Conv2d parameters cast to ``dtype`` into buffers kept
    across steps.

    Why: under autocast every step casts each weight to the low dtype and its gradient back to
    fp32 in fresh tensors; for the SD2 UNet that is 3.5 GB of new fp32 memory per step, and on a
    CPU the page faults of those allocations cost more than the casts. The values are the ones
    autocast computes (the same casts, once per forward; the same low-precision gradients, added
    to fp32 gradients), so this is a speed path only. The gradients are added into ``.grad`` in
    place, so zero them with ``zero_grad(set_to_none=False)``. Norm parameters stay fp32, as
    autocast's fp32 ops want them.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module = module
        self.dtype = dtype
        # Parameter objects stay the same through .to(), load_state_dict and optimizer steps.
        self.cast_params = {f"{prefix}.{name}" if prefix else name: param
                            for prefix, sub in module.named_modules() if isinstance(sub, (nn.Linear, nn.Conv2d))
                            for name, param in sub.named_parameters(recurse=False)}
        self._buffers_of: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _buffers_for(self, name: str, param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        buffers = self._buffers_of.get(name)
        if buffers is None or buffers[0].device != param.device or buffers[0].stride() != param.stride():
            buffers = (torch.empty_like(param, dtype=self.dtype), torch.empty_like(param))
            self._buffers_of[name] = buffers
        return buffers

    def forward(self, *args, **kwargs):
        casts = {}
        for name, param in self.cast_params.items():
            if torch.is_grad_enabled() and param.requires_grad and param.grad is None:
                param.grad = torch.zeros_like(param)
            casts[name] = _CastInto.apply(param, *self._buffers_for(name, param))
        return torch.func.functional_call(self.module, casts, args, kwargs)
