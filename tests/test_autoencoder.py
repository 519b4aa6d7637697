"""AutoencoderKL against the reference's golden outputs and the SD2 checkpoint's tensor names."""


import pytest
import torch

from sdcore.autoencoder import AutoencoderKL, sample_from_moments

SD2_VAE_DDCONFIG = dict(double_z=True, z_channels=4, resolution=256, in_channels=3, out_ch=3, ch=128,
                        ch_mult=[1, 2, 4, 4], num_res_blocks=2, attn_resolutions=[], dropout=0.0)


@pytest.fixture(scope="module")
def golden(reference):
    torch.set_num_threads(1)
    data = reference.golden("vae")
    vae = AutoencoderKL(data["ddconfig"], data["embed_dim"])
    vae.load_state_dict(data["state_dict"], strict=True)
    return vae.eval(), data


def test_moments_match_reference(golden):
    vae, data = golden
    with torch.no_grad():
        moments = vae.moments(data["image"])
    torch.testing.assert_close(moments, data["moments"], atol=1e-5, rtol=0)


def test_decode_matches_reference(golden):
    vae, data = golden
    with torch.no_grad():
        decoded = vae.decode(data["z"])
        from_scaled = vae.decode_latents(data["z"] * vae.scale_factor)
    torch.testing.assert_close(decoded, data["decoded"], atol=1e-5, rtol=0)
    torch.testing.assert_close(from_scaled, data["decoded"], atol=1e-5, rtol=0)


def test_full_size_vae_has_the_checkpoint_names_and_shapes(reference):
    tensors = reference.sd2_tensors()["tensors"]
    prefix = "first_stage_model."
    expected = {name[len(prefix):]: shape for name, shape in tensors.items() if name.startswith(prefix)}
    with torch.device("meta"):
        vae = AutoencoderKL(SD2_VAE_DDCONFIG, embed_dim=4)
    assert {name: list(t.shape) for name, t in vae.state_dict().items()} == expected
    assert round(sum(p.numel() for p in vae.parameters()) / 1e6, 1) == 83.7


def test_sample_from_moments_scales_and_clamps_logvar():
    mean = torch.full((1, 4, 2, 2), 0.5)
    logvar = torch.tensor([-100.0, 0.0, 2.0, 100.0]).reshape(1, 4, 1, 1).expand(1, 4, 2, 2)
    moments = torch.cat([mean, logvar], dim=1)
    z = sample_from_moments(moments, scale_factor=0.5, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3))
    std = torch.exp(0.5 * logvar.clamp(-30, 20))
    torch.testing.assert_close(z, (mean + std * noise) * 0.5)
    assert torch.isfinite(z).all()  # logvar 100 would overflow exp without the clamp to 20


def test_double_z_is_required():
    with pytest.raises(ValueError, match="double_z"):
        AutoencoderKL({**SD2_VAE_DDCONFIG, "double_z": False}, embed_dim=4)
