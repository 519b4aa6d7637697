"""Diffusion maths of SD2 with v-parameterisation: the linear schedule, noising, v-target, loss and DDIM sampling.

Precision follows the reference on purpose: the schedule is computed in float64, but the model-side code
works from alphas_cumprod rounded to float32 (the reference keeps it as a float32 buffer) and takes square roots
of that in float32. Matching this rounding reproduces the reference's noised inputs bit for bit.
"""

from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class LinearSchedule(nn.Module):
    """betas = linspace(sqrt(start), sqrt(end), T)**2 in float64, with the float32 coefficients derived from it.

    A module so that ``.to(device)`` moves the coefficient tables next to the latents (non-persistent buffers:
    the schedule is configuration, not state).
    """

    def __init__(self, linear_start: float = 0.00085, linear_end: float = 0.012, timesteps: int = 1000):
        super().__init__()
        betas = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.num_timesteps = timesteps
        self.register_buffer("betas", betas, persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        alphas_cumprod_f32 = alphas_cumprod.float()
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod_f32.sqrt(), persistent=False)
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1.0 - alphas_cumprod_f32).sqrt(), persistent=False)

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] shaped (B, 1, 1, ...) to broadcast over a batch like ``like``."""
        return table[t.to(table.device)].reshape(t.shape[0], *([1] * (like.dim() - 1))).to(like.device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(acp_t) x0 + sqrt(1 - acp_t) noise."""
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def v_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v = sqrt(acp_t) noise - sqrt(1 - acp_t) x0."""
        return self._at(self.sqrt_alphas_cumprod, t, x0) * noise - self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0

    def eps_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._at(self.sqrt_alphas_cumprod, t, x_t) * v + self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t

    def x0_from_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self._at(self.sqrt_alphas_cumprod, t, x_t) * x_t - self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v


def v_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over C, H, W per sample, then over the batch (the reference's loss_simple)."""
    per_sample = (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.dim())))
    return per_sample.mean()


def ddim_timesteps(num_steps: int, total: int = 1000) -> torch.Tensor:
    """The reference's "uniform" DDIM discretisation: every ``total // num_steps``-th step, shifted by one."""
    return torch.arange(0, total, total // num_steps, dtype=torch.int64) + 1


def ddim_sample(unet_fn: UNetFn, x_T: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None,
                schedule: LinearSchedule, steps: int = 50, eta: float = 0.0, guidance_scale: float = 8.0,
                generator: torch.Generator | None = None, progress: bool = False) -> torch.Tensor:
    """Run DDIM from x_T down to the final latent, with classifier-free guidance.

    ``unet_fn(x, t, context)`` predicts v. With guidance, the unconditional and conditional inputs go through
    one batched call on ``cat([uncond, cond])`` and are combined as ``uncond + s * (cond - uncond)``.
    """
    timesteps = ddim_timesteps(steps, schedule.num_timesteps)
    # The reference reads alphas_cumprod from its float32 buffer; sigma is then computed in float64.
    alphas_f32 = schedule.alphas_cumprod.float().cpu()
    alphas = alphas_f32[timesteps].double()
    alphas_prev = torch.cat([alphas_f32[:1], alphas_f32[timesteps[:-1]]]).double()
    sigmas = (eta * torch.sqrt((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev))).float()
    alphas_prev = alphas_prev.float()

    guided = uncond is not None and guidance_scale != 1.0
    batch = x_T.shape[0]
    x = x_T
    order = range(len(timesteps) - 1, -1, -1)
    if progress:
        order = tqdm(order, desc="DDIM", total=len(timesteps))
    for index in order:
        t = torch.full((batch,), int(timesteps[index]), dtype=torch.int64, device=x.device)
        if guided:
            v_uncond, v_cond = unet_fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([uncond, cond])).chunk(2)
            v = v_uncond + guidance_scale * (v_cond - v_uncond)
        else:
            v = unet_fn(x, t, cond)
        eps = schedule.eps_from_v(x, t, v)
        x0 = schedule.x0_from_v(x, t, v)
        a_prev, sigma = alphas_prev[index].to(x.device), sigmas[index].to(x.device)
        x = a_prev.sqrt() * x0 + (1.0 - a_prev - sigma**2).sqrt() * eps
        if sigmas[index] > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
    return x
