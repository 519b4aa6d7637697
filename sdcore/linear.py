"""Linear layers of the UNet, with an optional oneDNN kernel for fp32 on a CPU (a fast path).

Why: PyTorch's fp32 matmul on a CPU is MKL's sgemm, and on AMD EPYCs MKL takes its AVX2 code
path even where the CPU has AVX-512: measured on an EPYC with AVX-512 (2 cores), 143-175 GFLOP/s
for the UNet's linear layers forward + backward, against 250-375 GFLOP/s for oneDNN's AVX-512
kernels on the same products. oneDNN runs a linear layer as a 1x1 convolution over a
channels-last view of the (tokens, features) matrix: no copy in or out, and autograd's
convolution backward keeps both gradients in oneDNN. The sums are in another order, so in fp32
it agrees with ``F.linear`` to rounding. Under autocast the low-precision matmul is oneDNN's
already, so the switch applies to fp32 only. It pays off at the full-size UNet's widths (hundreds
of channels); at the demo's few dozen, the convolution's set-up costs more than MKL's small GEMMs
(sampling at demo scale measured 0.91x of diffusers with it, 1.19x without).

``Linear`` is ``nn.Linear`` (same parameters and state_dict names) with one switch, ``onednn``.
"""

import torch
import torch.nn.functional as F
from torch import nn


def linear_onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through oneDNN's convolution: the rows of ``x`` are the pixels
    of a (1, in_features, rows, 1) channels-last image, which is the same memory."""
    rows = x.reshape(-1, x.shape[-1])
    n, k = rows.shape
    out = F.conv2d(rows.view(1, n, 1, k).permute(0, 3, 1, 2), weight[:, :, None, None], bias)
    return out.permute(0, 2, 3, 1).reshape(*x.shape[:-1], weight.shape[0])


class Linear(nn.Linear):
    """``nn.Linear`` that runs fp32 CPU calls through ``linear_onednn`` when ``onednn`` is set."""

    onednn: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.onednn and x.dtype == self.weight.dtype == torch.float32 and x.device.type == "cpu"
                and not torch.is_autocast_enabled("cpu")):
            return linear_onednn(x, self.weight, self.bias)
        return super().forward(x)


def set_linear_onednn(model: nn.Module, enabled: bool) -> int:
    """Set ``onednn`` on every ``Linear`` inside ``model``; returns how many were set."""
    linears = [module for module in model.modules() if isinstance(module, Linear)]
    for linear in linears:
        linear.onednn = enabled
    return len(linears)
