"""Shared builders of tiny checkpoints: a random VAE checkpoint with its config (the sdcore.prep tests), and
a tiny SD-style checkpoint with the model config around it (evaluation and sampling tests)."""

import open_clip
import reference
import torch
import yaml

import sdcore.text_encoder  # noqa: F401  registers sdcore-tiny-clip
from sdcore.autoencoder import AutoencoderKL
from sdcore.text_encoder import FrozenOpenCLIPText

TINY_CLIP_ARCH = "sdcore-tiny-clip"


def tiny_vae_checkpoint(root, seed=0):
    """Write an SD-style checkpoint {"state_dict": {"first_stage_model.*": ...}} holding a VAE with the golden
    ddconfig (ch 32) and random weights, plus a workflow-config YAML naming it. Returns (vae, ckpt, config)."""
    golden = reference.golden("vae")
    params = {"embed_dim": golden["embed_dim"], "ddconfig": golden["ddconfig"]}
    torch.manual_seed(seed)
    vae = AutoencoderKL(params["ddconfig"], params["embed_dim"]).eval()
    # Random init leaves some layers at zero bias; perturb everything so every weight matters.
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.02 * torch.randn_like(p))
    state = {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}
    state["model.diffusion_model.ignored"] = torch.zeros(1)  # other parts of a real checkpoint are ignored
    ckpt = root / "sd.ckpt"
    torch.save({"state_dict": state}, ckpt)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({"model": {"params": {"first_stage_config": {"params": params}}}}))
    return vae, ckpt, config, params


def tiny_model_params(latent_size=8):
    """``model.params`` of a workflow config for the golden UNet and VAE (8x downsampling: 64-px images for
    8-px latents) conditioned by the tiny OpenCLIP text tower."""
    unet, vae = reference.golden("unet"), reference.golden("vae")
    return {
        "linear_start": 0.00085, "linear_end": 0.012, "timesteps": 1000, "scale_factor": 0.18215,
        "image_size": latent_size, "channels": 4,
        "unet_config": {"params": unet["config"]},
        "first_stage_config": {"params": {"embed_dim": vae["embed_dim"], "ddconfig": vae["ddconfig"]}},
        "cond_stage_config": {"params": {"arch": TINY_CLIP_ARCH, "layer": "penultimate", "max_length": 77}},
    }


def golden_unet_state():
    """The golden UNet's weights (what a training checkpoint of ``tiny_model_params`` holds)."""
    return reference.golden("unet")["state_dict"]


def tiny_sd_checkpoint(path, seed=0):
    """An SD-style ``{"state_dict": ...}`` file: the golden VAE (``first_stage_model.``) and a seeded tiny
    text tower (``cond_stage_model.``), the frozen parts ``tiny_model_params`` needs."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = FrozenOpenCLIPText(TINY_CLIP_ARCH)
    state = {f"first_stage_model.{k}": v for k, v in reference.golden("vae")["state_dict"].items()}
    state.update({f"cond_stage_model.{k}": v for k, v in text_encoder.state_dict().items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state}, path)
    return path


def tiny_clip_weights(path, seed=0):
    """Seeded weights of the whole tiny OpenCLIP model (the CLIP-score model of the tests)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = open_clip.create_model(TINY_CLIP_ARCH).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path
