"""Schedule, noising, v-target, loss and the guided DDIM sampler against the reference's golden data."""


import pytest
import torch

from sdcore.diffusion import LinearSchedule, ddim_sample, ddim_timesteps, v_loss
from sdcore.unet import UNetModel



@pytest.fixture(scope="module")
def golden(reference):
    torch.set_num_threads(1)
    return reference.golden("diffusion")


@pytest.fixture(scope="module")
def schedule(golden):
    return LinearSchedule(golden["linear_start"], golden["linear_end"], golden["timesteps"])


def test_schedule_matches_reference_in_float64(golden, schedule):
    assert schedule.betas.dtype == schedule.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(schedule.betas, golden["betas"], atol=1e-15, rtol=0)
    torch.testing.assert_close(schedule.alphas_cumprod, golden["alphas_cumprod"], atol=1e-15, rtol=0)


def test_noising_target_and_loss_match_reference(golden, schedule):
    x_t = schedule.q_sample(golden["x0"], golden["t"], golden["noise"])
    v = schedule.v_target(golden["x0"], golden["noise"], golden["t"])
    torch.testing.assert_close(x_t, golden["x_t"], atol=1e-5, rtol=0)
    torch.testing.assert_close(v, golden["v_target"], atol=1e-5, rtol=0)
    torch.testing.assert_close(v_loss(golden["unet_pred"], golden["v_target"]), golden["loss"], atol=1e-5, rtol=0)


def test_loss_averages_each_sample_before_the_batch():
    pred = torch.zeros(2, 1, 2, 2)
    target = torch.stack([torch.full((1, 2, 2), 1.0), torch.full((1, 2, 2), 3.0)])
    assert v_loss(pred, target).item() == pytest.approx((1.0 + 9.0) / 2)


def test_eps_and_x0_recovered_from_v(golden, schedule):
    x_t = schedule.q_sample(golden["x0"], golden["t"], golden["noise"])
    v = schedule.v_target(golden["x0"], golden["noise"], golden["t"])
    torch.testing.assert_close(schedule.x0_from_v(x_t, golden["t"], v), golden["x0"], atol=1e-5, rtol=0)
    torch.testing.assert_close(schedule.eps_from_v(x_t, golden["t"], v), golden["noise"], atol=1e-5, rtol=0)


def test_ddim_timesteps_are_the_reference_uniform_steps(golden):
    steps = ddim_timesteps(50, 1000)
    assert torch.equal(steps, golden["ddim_timesteps"])
    assert steps[0].item() == 1 and steps[-1].item() == 981


def test_guided_ddim_trajectory_matches_reference(reference, golden, schedule):
    unet_golden = reference.golden("unet")
    unet = UNetModel(**unet_golden["config"])
    unet.load_state_dict(unet_golden["state_dict"], strict=True)
    unet.eval()
    run = golden["ddim"]
    with torch.no_grad():
        samples = ddim_sample(unet, run["x_T"], run["cond"], run["uncond"], schedule, steps=run["steps"],
                              eta=run["eta"], guidance_scale=run["guidance_scale"])
    torch.testing.assert_close(samples, run["samples"], atol=1e-4, rtol=0)


class RecordingUNet:
    """Stands in for the UNet: records each call and predicts a fixed fraction of its input."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, context):
        self.calls.append((x.shape[0], t.clone(), context.clone()))
        return 0.1 * x + context.mean() * torch.ones_like(x)


def test_guidance_uses_one_batched_call_per_step(schedule):
    unet = RecordingUNet()
    x_T = torch.randn(3, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    cond, uncond = torch.ones(3, 5, 8), torch.zeros(3, 5, 8)
    ddim_sample(unet, x_T, cond, uncond, schedule, steps=10, guidance_scale=8.0)
    assert len(unet.calls) == 10
    batch, t, context = unet.calls[0]
    assert batch == 6 and t.tolist() == [901] * 6
    assert torch.equal(context, torch.cat([uncond, cond]))
    assert [call[1][0].item() for call in unet.calls] == ddim_timesteps(10).flip(0).tolist()


def test_eta_adds_seeded_noise_only_when_positive(schedule):
    x_T = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0))
    cond, uncond = torch.ones(2, 5, 8), torch.zeros(2, 5, 8)

    def sample(eta, seed):
        return ddim_sample(RecordingUNet(), x_T, cond, uncond, schedule, steps=5, eta=eta,
                           generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(0.0, 1), sample(0.0, 2))
    assert torch.equal(sample(1.0, 1), sample(1.0, 1))
    assert not torch.allclose(sample(1.0, 1), sample(1.0, 2))
