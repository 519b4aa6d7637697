"""Fast-path switches for the UNet: attention kernel, channels-last, autocast, persistent weight
casts, GEMM convolutions on small maps, Winograd convolutions on large ones, oneDNN linear layers,
torch.compile, and the fused AdamW kernel.

Faithful fp32 eager (the defaults) is what the golden tests check; each switch is an option
the trainer and evaluator turn on from config and that tests compare against fp32 eager.
"""

import contextlib
import ctypes
import functools
import itertools
import logging
import time
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from sdcore.attention import check_attention_backend, set_attention_backend
from sdcore.conv import set_conv_gemm
from sdcore.linear import linear_onednn, set_linear_onednn

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# train.precision / eval precision names -> autocast setting
PRECISION_TO_AUTOCAST = {"fp32": None, "bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class FastPaths:
    attention: str = "math"        # "math" (reference fp32 softmax) | "sdpa" | "onednn" (fp32 CPU products on oneDNN)
    channels_last: bool = False
    autocast: str | None = None    # None | "bf16" | "fp16"
    compile: bool = False
    conv_gemm_max_pixels: int = 0  # 0 | maps of at most this many pixels convolve as one GEMM
    conv_winograd_min_pixels: int = 0  # 0 | 3x3 convolutions of maps of at least this many pixels as Winograd F(2x2, 3x3)
    conv_winograd4_min_pixels: int = 0  # 0 | the same as F(4x4, 3x3) (4x fewer multiply-adds, ~10x the fp32 rounding); first
    persistent_weight_casts: bool = False  # with autocast: weight casts into buffers kept across steps
    onednn_linear: bool = False    # fp32 linear layers and GEMM convolutions on a CPU: oneDNN's GEMM, not the BLAS sgemm
    fused_optimizer: bool = False  # AdamW as one fused kernel (ulp-level differences) | foreach
    keep_freed_memory: bool = False  # the process's C heap keeps freed memory for the next step (no page faults)

    def __post_init__(self):
        check_attention_backend(self.attention)
        for key in ("conv_gemm_max_pixels", "conv_winograd_min_pixels", "conv_winograd4_min_pixels"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
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
        ``keep_freed_memory`` is set for the whole process (``keep_freed_memory()``).
        """
        if self.keep_freed_memory:
            keep_freed_memory()
        set_attention_backend(model, self.attention)
        set_conv_gemm(model, self.conv_gemm_max_pixels, onednn=self.onednn_linear,
                      winograd_min_pixels=self.conv_winograd_min_pixels,
                      winograd4_min_pixels=self.conv_winograd4_min_pixels)
        set_linear_onednn(model, self.onednn_linear)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.persistent_weight_casts:
            model = PersistentWeightCasts(model, self.autocast_dtype)
        if self.compile:
            model = torch.compile(model)
        return model

    @property
    def optimizer_options(self) -> dict:
        """Keyword arguments of ``torch.optim.AdamW``. The faithful default is ``foreach``: the
        implementation PyTorch picks on CUDA (the reference's), bitwise equal to the per-tensor loop
        it picks on a CPU, whose Python overhead costs a fifth of a small model's step. ``fused``
        updates every parameter in one kernel; it rounds differently (ulp-level), so it is an option."""
        return {"fused": True} if self.fused_optimizer else {"foreach": True}

    def autocast_context(self, device_type: str | torch.device):
        """Autocast region for the forward pass (a no-op context in fp32)."""
        if self.autocast is None:
            return contextlib.nullcontext()
        device_type = torch.device(device_type).type
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)


class _CastInto(torch.autograd.Function):
    """``weight`` cast into the preallocated ``low`` buffer; the gradient comes back converted into
    ``grad_buffer``, fp32 memory kept across steps, so no step allocates (and page-faults)
    weight-sized memory."""

    @staticmethod
    def forward(ctx, weight, low, grad_buffer):
        ctx.grad_buffer = grad_buffer
        # Through .data: refilling the buffer with the same weights (a second forward before
        # backward) must not look like an in-place change to the tensors autograd saved.
        low.data.copy_(weight)
        return low.detach()

    @staticmethod
    def backward(ctx, grad):
        # The buffer leaves ctx before it is returned: AccumulateGrad adopts a gradient as ``.grad``
        # (no zero fill, no add) only when nothing else holds it.
        grad_buffer, ctx.grad_buffer = ctx.grad_buffer, None
        return grad.float() if grad_buffer is None else grad_buffer.copy_(grad), None, None


class PersistentWeightCasts(nn.Module):
    """Runs ``module`` with its Linear and Conv2d parameters cast to ``dtype`` into buffers kept
    across steps, and their fp32 gradients written into memory kept across steps.

    Why: under autocast every step casts each weight to the low dtype and its gradient back to
    fp32 in fresh tensors; for the SD2 UNet that is 3.5 GB of new fp32 memory per step, and on a
    CPU the page faults of those allocations cost more than the casts. The values are the ones
    autocast computes (the same casts, once per forward; the same low-precision gradients, added
    to fp32 gradients), so this is a speed path only. Norm parameters stay fp32, as autocast's fp32
    ops want them.

    Zero the gradients with ``zero_grad(set_to_none=True)``: a step that starts with ``.grad`` None
    hands last step's gradient tensor back to autograd as the buffer its gradient is converted into,
    and AccumulateGrad adopts that buffer as the new ``.grad``, so there is no zero fill and no
    addition (measured: 3-20 % of the full-size bf16 step). A micro-batch that accumulates into an
    existing ``.grad`` (gradient accumulation, or ``set_to_none=False``) converts into a second buffer
    that is added, as autocast's gradients are.
    """

    def __init__(self, module: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.module = module
        self.dtype = dtype
        # Parameter objects stay the same through .to(), load_state_dict and optimizer steps.
        # A weight tied into several layers gets one cast under all their names, as autocast's
        # cache gives it (its low-precision gradients add up before the one conversion to fp32).
        names_of: dict[nn.Parameter, list[str]] = {}
        for prefix, sub in module.named_modules():  # a module used twice is listed once
            if isinstance(sub, (nn.Linear, nn.Conv2d)):
                for name, param in sub.named_parameters(recurse=False):
                    names_of.setdefault(param, []).append(f"{prefix}.{name}" if prefix else name)
        self.cast_params = {names[0]: param for param, names in names_of.items()}
        self._tied_names = {names[0]: names for names in names_of.values()}
        self._low_of: dict[str, torch.Tensor] = {}
        self._accumulation_buffer_of: dict[str, torch.Tensor] = {}
        # Each parameter's last .grad, kept by a hook after autograd wrote it; taken back by a forward.
        self._last_grad_of: dict[str, torch.Tensor] = {}
        this = weakref.ref(self)
        handles = [param.register_post_accumulate_grad_hook(functools.partial(_keep_grad, this, name))
                   for name, param in self.cast_params.items()]
        # The parameters outlive this wrapper (the caller keeps the module): their hooks go with it.
        weakref.finalize(self, _remove_hooks, handles)

    def _grad_buffer(self, name: str, param: torch.Tensor) -> torch.Tensor:
        last = self._last_grad_of.pop(name, None)
        if param.grad is None:  # a new step: last step's gradient memory becomes this one's
            return last if _fits(last, param, param.dtype) else torch.empty_like(param)
        return self._kept(self._accumulation_buffer_of, name, param, param.dtype)

    @staticmethod
    def _kept(store: dict[str, torch.Tensor], name: str, param: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        buffer = store.get(name)
        if not _fits(buffer, param, dtype):
            buffer = store[name] = torch.empty_like(param, dtype=dtype)
        return buffer

    def forward(self, *args, **kwargs):
        casts, grad_enabled = {}, torch.is_grad_enabled()
        for name, param in self.cast_params.items():
            grad_buffer = self._grad_buffer(name, param) if grad_enabled and param.requires_grad else None
            cast = _CastInto.apply(param, self._kept(self._low_of, name, param, self.dtype), grad_buffer)
            casts.update(dict.fromkeys(self._tied_names[name], cast))
        # tie_weights=False: the names are given explicitly; torch's own tying restores a module
        # used twice with the cast in place of its Parameter.
        return torch.func.functional_call(self.module, casts, args, kwargs, tie_weights=False)


def _fits(buffer: torch.Tensor | None, param: torch.Tensor, dtype: torch.dtype) -> bool:
    return (buffer is not None and buffer.device == param.device and buffer.stride() == param.stride()
            and buffer.dtype == dtype)


def _keep_grad(wrapper_ref, name: str, param: torch.Tensor) -> None:
    wrapper = wrapper_ref()
    if wrapper is not None:
        wrapper._last_grad_of[name] = param.grad


def _remove_hooks(handles) -> None:
    for handle in handles:
        handle.remove()


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Make this process's C heap (glibc) keep the memory it frees for its next allocations: no
    fresh mapping for a large block, and the heap's free top never handed back to the kernel.

    Why: a training step on a CPU allocates and frees the same gigabytes every step (the SD2 UNet's
    3.5 GB of fp32 gradients, its activations). glibc maps each block above its threshold (at most
    32 MB) fresh and unmaps it when freed, so every step page-faults that memory in again: measured
    0.9-1.2 M minor faults, a third of the full-size fp32 step. The values computed do not change;
    the process keeps its peak memory until it exits. Process-wide and idempotent; returns False
    (and changes nothing) where the C library has no glibc ``mallopt``."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # A trim threshold of -1 is SIZE_MAX once glibc widens it: never trim.
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _best_gflops(run, flops: float, seconds: float) -> float:
    """GFLOP/s of the fastest call of ``run`` within ``seconds`` (after a warm-up call, in which
    oneDNN picks its kernel): the best call, so a burst of load from other processes is not
    counted as this CPU's speed."""
    run()
    best, start = float("inf"), time.perf_counter()
    for calls in itertools.count(1):
        tic = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - tic)
        if calls >= 3 and time.perf_counter() - start >= seconds:
            return flops / best / 1e9


def matmul_gflops(dtype: torch.dtype, size: int = 1024, seconds: float = 0.2) -> float:
    """Measured matrix-multiply throughput of this CPU at ``dtype`` (GFLOP/s, current thread count):
    ``torch.matmul``, which is the BLAS (MKL) sgemm in fp32 and oneDNN in bf16."""
    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    return _best_gflops(lambda: a @ b, 2 * size**3, seconds)


def onednn_linear_gflops(size: int = 1024, seconds: float = 0.2) -> float:
    """Measured fp32 throughput of ``sdcore.linear.linear_onednn`` (the ``onednn_linear`` path) at the
    product ``matmul_gflops`` times, so the two compare."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    return _best_gflops(lambda: linear_onednn(a, b, None), 2 * size**3, seconds)


def warn_if_slow_precision(precision: str, device: torch.device) -> None:
    """One warning line when a CPU run asks for bf16/fp16 autocast and this CPU computes that
    precision slower than fp32 (no AMX: the low-precision matmuls are emulated or narrow)."""
    if device.type != "cpu" or precision == "fp32":
        return
    dtype = AUTOCAST_DTYPES[PRECISION_TO_AUTOCAST[precision]]
    low, full = matmul_gflops(dtype), matmul_gflops(torch.float32)
    if low < full:
        logging.getLogger(__name__).warning(
            "%s autocast on a CPU where %s matmul runs at %.0f GFLOP/s and fp32 at %.0f (capability %s%s): "
            "fp32 is likely faster here", precision, precision, low, full, torch.backends.cpu.get_cpu_capability(),
            ", AMX" if "amx_bf16" in cpu_flags() else ", no AMX")


# What recommend_fast_paths picks, per case; each choice measured with benchmarks/unet_train_step.py
# (full-size UNet, batch 4, 32x32 latent; README speed section).
CPU_FP32_CONV_GEMM_MAX_PIXELS = 16     # fp32 on a CPU: oneDNN's backward on 4x4 maps is the slow case
CPU_FP32_ONEDNN_CONV_GEMM_MAX_PIXELS = 64  # fp32 where the GEMM is oneDNN's (onednn_linear): 8x8 maps too
CPU_LOW_PRECISION_CONV_GEMM_MAX_PIXELS = 64  # bf16/fp16 autocast on a CPU with fast bf16 (AMX, Zen AVX-512 BF16)
CPU_FP32_CONV_WINOGRAD_MIN_PIXELS = 256  # fp32 on a CPU: 16x16 and larger maps as Winograd (8x8: the filter transform costs more)
CPU_FP32_CONV_WINOGRAD4_MIN_PIXELS = 1024  # and 32x32 and larger as F(4x4, 3x3) (16x16: F(2x2, 3x3) is faster with AVX-512)
# With AVX2 kernels (capability AVX2) the products are slower against the transforms: 8x8 maps as F(2x2, 3x3)
# and 16x16 as F(4x4, 3x3) too (kernels capped at AVX2 on an AMD EPYC: 8.95 s/step against 9.42)
CPU_AVX2_FP32_CONV_WINOGRAD_MIN_PIXELS = 64
CPU_AVX2_FP32_CONV_WINOGRAD4_MIN_PIXELS = 256
FAST_BF16_MARGIN = 1.0                 # bf16 counts as fast where its matmul beats fp32 by this factor
ONEDNN_LINEAR_MARGIN = 1.2             # fp32 linears go to oneDNN where it beats the BLAS sgemm by this factor


def recommend_precision(fp32_gflops: float | None = None, bf16_gflops: float | None = None) -> str:
    """``"bf16"`` where this CPU's bf16 matmul is faster than its fp32 one (AMX Xeons; AMD EPYCs with
    AVX-512 BF16, measured 4x), else ``"fp32"`` (Xeons with AVX-512 but no AMX: narrower; AVX2:
    emulated). Peaks are measured when not given."""
    fp32 = matmul_gflops(torch.float32) if fp32_gflops is None else fp32_gflops
    bf16 = matmul_gflops(torch.bfloat16) if bf16_gflops is None else bf16_gflops
    return "bf16" if bf16 > FAST_BF16_MARGIN * fp32 else "fp32"


def recommend_fast_paths(precision: str = "fp32", device: str | torch.device = "cpu",
                         fp32_gflops: float | None = None, bf16_gflops: float | None = None,
                         onednn_fp32_gflops: float | None = None, capability: str | None = None) -> FastPaths:
    """The fast paths to train the UNet with at ``precision`` on ``device``, chosen from what this
    machine is (measured, or the given matmul peaks): each switch is one that was faster there.

    * every device: the fused AdamW kernel (one pass over the parameters instead of a dozen) and
      sdpa attention (fused; the reference's math attention materialises the scores) unless
      ``attention: onednn`` below;
    * CPU: ``keep_freed_memory`` (no page faults for the memory every step frees and takes again);
    * CUDA: channels-last (cuDNN's NHWC kernels), no GEMM convolutions (cuDNN picks its own);
    * CPU, fp32: convolutions on maps of at most ``CPU_FP32_CONV_GEMM_MAX_PIXELS`` pixels as GEMMs
      (``CPU_FP32_ONEDNN_CONV_GEMM_MAX_PIXELS`` where the GEMM is oneDNN's);
      contiguous (NCHW) activations, which oneDNN's fp32 kernels run faster than channels-last on
      the UNet's small maps; linear layers and those GEMM convolutions on oneDNN's GEMM where it
      beats the BLAS sgemm in fp32 by ``ONEDNN_LINEAR_MARGIN`` (AMD EPYCs, where MKL takes its AVX2 path),
      and there the attention's products too (``attention: onednn``; 1.6-1.9x the fused kernel from
      1024 tokens);
      3x3 convolutions of maps of at least ``CPU_FP32_CONV_WINOGRAD_MIN_PIXELS`` as Winograd F(2x2, 3x3)
      (2.25x fewer multiply-adds where the native convolution already runs near the matmul peak),
      of at least ``CPU_FP32_CONV_WINOGRAD4_MIN_PIXELS`` as F(4x4, 3x3) (4x fewer; in fp32 only: its
      larger transformed values would cost bf16 products several ulps); both from smaller maps
      (``CPU_AVX2_FP32_CONV_WINOGRAD*_MIN_PIXELS``) where the kernels' ``capability`` (default:
      ``torch.backends.cpu.get_cpu_capability()``) is AVX2;
    * CPU, bf16/fp16 autocast where bf16 is fast: GEMM convolutions up to
      ``CPU_LOW_PRECISION_CONV_GEMM_MAX_PIXELS`` pixels and persistent weight casts. Where bf16 is
      not fast, the fp32 choice (autocast stays as asked: precision is the run's decision, and
      ``warn_if_slow_precision`` says it is slow).
    """
    autocast = PRECISION_TO_AUTOCAST[precision]
    device = torch.device(device)
    if device.type == "cuda":
        return FastPaths(attention="sdpa", channels_last=True, autocast=autocast, fused_optimizer=True)
    if autocast is not None and recommend_precision(fp32_gflops, bf16_gflops) == "bf16":
        return FastPaths(attention="sdpa", autocast=autocast, conv_gemm_max_pixels=CPU_LOW_PRECISION_CONV_GEMM_MAX_PIXELS,
                         persistent_weight_casts=True, fused_optimizer=True, keep_freed_memory=True)
    onednn = autocast is None and onednn_beats_blas(fp32_gflops, onednn_fp32_gflops)
    capability = torch.backends.cpu.get_cpu_capability() if capability is None else capability
    if autocast is not None:
        winograd, winograd4 = CPU_FP32_CONV_WINOGRAD_MIN_PIXELS, 0
    elif capability == "AVX2":
        winograd, winograd4 = CPU_AVX2_FP32_CONV_WINOGRAD_MIN_PIXELS, CPU_AVX2_FP32_CONV_WINOGRAD4_MIN_PIXELS
    else:
        winograd, winograd4 = CPU_FP32_CONV_WINOGRAD_MIN_PIXELS, CPU_FP32_CONV_WINOGRAD4_MIN_PIXELS
    return FastPaths(attention="onednn" if onednn else "sdpa", autocast=autocast, onednn_linear=onednn,
                     conv_gemm_max_pixels=CPU_FP32_ONEDNN_CONV_GEMM_MAX_PIXELS if onednn else CPU_FP32_CONV_GEMM_MAX_PIXELS,
                     conv_winograd_min_pixels=winograd, conv_winograd4_min_pixels=winograd4,
                     fused_optimizer=True,
                     keep_freed_memory=True)


def onednn_beats_blas(fp32_gflops: float | None = None, onednn_fp32_gflops: float | None = None) -> bool:
    """Whether oneDNN's fp32 GEMM beats the BLAS sgemm here by ``ONEDNN_LINEAR_MARGIN`` (measured
    when not given): on AMD EPYCs MKL runs its AVX2 kernels even on AVX-512 CPUs."""
    fp32 = matmul_gflops(torch.float32) if fp32_gflops is None else fp32_gflops
    onednn = onednn_linear_gflops() if onednn_fp32_gflops is None else onednn_fp32_gflops
    return onednn > ONEDNN_LINEAR_MARGIN * fp32
