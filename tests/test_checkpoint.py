"""Safe, strict checkpoint loading: SD-style .ckpt and .safetensors, clear errors, no code execution."""

import hashlib
import os

import pytest
import torch
from safetensors.torch import save_file

from sdcore.autoencoder import AutoencoderKL
from sdcore.checkpoint import (CheckpointError, extract_part, load_frozen_models, load_part, load_state_dict_file,
                               sha256_file)
from sdcore.text_encoder import FrozenOpenCLIPText
from sdcore.unet import UNetModel

TINY_VAE = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)
TINY_UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2],
                 num_res_blocks=1, channel_mult=[1, 2], num_head_channels=8, use_spatial_transformer=True,
                 use_linear_in_transformer=True, transformer_depth=1, context_dim=48, legacy=False)
MODEL_PARAMS = {
    "scale_factor": 0.18215,
    "first_stage_config": {"params": {"embed_dim": 4, "ddconfig": TINY_VAE}},
    "cond_stage_config": {"params": {"arch": "sdcore-tiny-clip", "layer": "penultimate", "max_length": 77}},
    "unet_config": {"params": TINY_UNET},
}


@pytest.fixture(scope="module")
def sd_state_dict():
    """A tiny SD checkpoint's state dict with the real prefixes."""
    torch.manual_seed(0)
    parts = {"first_stage_model.": AutoencoderKL(TINY_VAE, 4), "cond_stage_model.": FrozenOpenCLIPText("sdcore-tiny-clip"),
             "model.diffusion_model.": UNetModel(**TINY_UNET)}
    return {prefix + name: tensor for prefix, module in parts.items() for name, tensor in module.state_dict().items()}


def assert_same_weights(module, state_dict, prefix):
    loaded = module.state_dict()
    expected = extract_part(state_dict, prefix)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)


def test_sd_ckpt_loads_every_part(tmp_path, sd_state_dict):
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": sd_state_dict, "global_step": 7}, path)
    vae, text_encoder, unet = load_frozen_models(path, MODEL_PARAMS, load_unet=True)
    assert_same_weights(vae, sd_state_dict, "first_stage_model.")
    assert_same_weights(text_encoder, sd_state_dict, "cond_stage_model.")
    assert_same_weights(unet, sd_state_dict, "model.diffusion_model.")
    assert not vae.training and not any(p.requires_grad for p in vae.parameters())
    assert len(load_frozen_models(path, MODEL_PARAMS)) == 2


def test_safetensors_file_loads(tmp_path, sd_state_dict):
    path = tmp_path / "tiny.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in sd_state_dict.items()}, str(path))
    loaded = load_state_dict_file(path)
    assert loaded.keys() == sd_state_dict.keys()
    assert all(torch.equal(loaded[name], sd_state_dict[name]) for name in loaded)


def test_missing_unexpected_and_misshaped_tensors_are_all_named(sd_state_dict):
    broken = dict(sd_state_dict)
    del broken["first_stage_model.decoder.conv_out.bias"]
    broken["first_stage_model.encoder.extra.weight"] = torch.zeros(1)
    broken["first_stage_model.quant_conv.weight"] = torch.zeros(8, 8, 3, 3)
    with pytest.raises(CheckpointError) as error:
        load_part(AutoencoderKL(TINY_VAE, 4), broken, "first_stage_model.", "VAE")
    message = str(error.value)
    assert "VAE" in message
    assert "missing (1): decoder.conv_out.bias" in message
    assert "unexpected (1): encoder.extra.weight" in message
    assert "quant_conv.weight (8, 8, 3, 3) != (8, 8, 1, 1)" in message


def test_checkpoint_without_a_part_fails(tmp_path, sd_state_dict):
    path = tmp_path / "no_text.ckpt"
    torch.save({"state_dict": {k: v for k, v in sd_state_dict.items() if not k.startswith("cond_stage_model.")}}, path)
    with pytest.raises(CheckpointError, match=r"text encoder .*missing .*model\.token_embedding\.weight"):
        load_frozen_models(path, MODEL_PARAMS)


class RunsAShellCommand:
    """Unpickling this object would run ``touch <marker>``."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "code_ran"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"weight": torch.zeros(1), "payload": RunsAShellCommand(marker)}}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_state_dict_file(path)
    assert not marker.exists()


def test_non_tensor_entries_and_unknown_formats_are_rejected(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"weight": torch.zeros(1), "note": "hello"}, path)
    with pytest.raises(CheckpointError, match="not tensors: note"):
        load_state_dict_file(path)
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        load_state_dict_file(tmp_path / "weights.npz")


def test_sha256_file(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"x" * 3_000_000)
    assert sha256_file(path) == hashlib.sha256(b"x" * 3_000_000).hexdigest()
