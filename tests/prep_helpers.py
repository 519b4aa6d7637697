"""Shared builders for the sdcore.prep tests: a tiny random VAE checkpoint and its config."""

import reference
import torch
import yaml

from sdcore.autoencoder import AutoencoderKL


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
