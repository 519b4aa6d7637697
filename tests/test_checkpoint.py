"""Checkpoint files (sdcore.checkpoint): the SD checkpoint's parts load strictly and safely, training
checkpoints round-trip through safetensors with their metadata, and every broken file is an error naming it."""

import hashlib
import json
import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from sdcore.autoencoder import AutoencoderKL
from sdcore.checkpoint import (TEXT_ENCODER_PREFIX, UNET_PREFIX, VAE_PREFIX, CheckpointError, StableDiffusionCheckpoint,
                               extract_part, load_part, load_state_dict_file, load_unet, save_unet, sha256_file)
from sdcore.text_encoder import FrozenOpenCLIPText
from sdcore.unet import UNetModel

TINY_VAE = dict(double_z=True, z_channels=4, resolution=32, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[], dropout=0.0)
TINY_UNET = dict(image_size=8, in_channels=4, out_channels=4, model_channels=32, attention_resolutions=[2],
                 num_res_blocks=1, channel_mult=[1, 2], num_head_channels=8, use_spatial_transformer=True,
                 use_linear_in_transformer=True, transformer_depth=1, context_dim=48, legacy=False)
VAE_PARAMS = {"embed_dim": 4, "ddconfig": TINY_VAE}
TEXT_PARAMS = {"arch": "sdcore-tiny-clip", "layer": "penultimate", "max_length": 77}
SCALE_FACTOR = 0.18215


@pytest.fixture(scope="module")
def sd_state_dict():
    """A tiny SD checkpoint's state dict with the real prefixes."""
    torch.manual_seed(0)
    parts = {VAE_PREFIX: AutoencoderKL(TINY_VAE, 4), TEXT_ENCODER_PREFIX: FrozenOpenCLIPText("sdcore-tiny-clip"),
             UNET_PREFIX: UNetModel(**TINY_UNET)}
    return {prefix + name: tensor for prefix, module in parts.items() for name, tensor in module.state_dict().items()}


@pytest.fixture(scope="module")
def sd_file(tmp_path_factory, sd_state_dict):
    path = tmp_path_factory.mktemp("sd") / "tiny.ckpt"
    torch.save({"state_dict": sd_state_dict, "global_step": 7}, path)  # Lightning's layout
    return path


def assert_same_weights(module, state_dict, prefix):
    loaded = module.state_dict()
    expected = extract_part(state_dict, prefix)
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)


def test_sd_checkpoint_loads_every_part_frozen(sd_file, sd_state_dict):
    checkpoint = StableDiffusionCheckpoint(sd_file)
    vae = checkpoint.vae(VAE_PARAMS, SCALE_FACTOR)
    text_encoder = checkpoint.text_encoder(TEXT_PARAMS)
    unet = checkpoint.unet(TINY_UNET)
    assert_same_weights(vae, sd_state_dict, VAE_PREFIX)
    assert_same_weights(text_encoder, sd_state_dict, TEXT_ENCODER_PREFIX)
    assert_same_weights(unet, sd_state_dict, UNET_PREFIX)
    assert vae.scale_factor == SCALE_FACTOR
    for part in (vae, text_encoder, unet):
        assert not part.training and not any(p.requires_grad for p in part.parameters())
    with pytest.raises(ValueError, match="penultimate"):
        checkpoint.text_encoder({**TEXT_PARAMS, "layer": "last"})


def test_safetensors_file_loads(tmp_path, sd_state_dict):
    path = tmp_path / "tiny.safetensors"
    save_file({name: tensor.contiguous() for name, tensor in sd_state_dict.items()}, str(path))
    loaded = load_state_dict_file(path)
    assert loaded.keys() == sd_state_dict.keys()
    assert all(torch.equal(loaded[name], sd_state_dict[name]) for name in loaded)
    assert_same_weights(StableDiffusionCheckpoint(path).vae(VAE_PARAMS, SCALE_FACTOR), sd_state_dict, VAE_PREFIX)


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


def test_checkpoint_without_a_part_lists_every_missing_name(tmp_path, sd_state_dict):
    path = tmp_path / "no_text.ckpt"
    torch.save({"state_dict": {k: v for k, v in sd_state_dict.items() if not k.startswith(TEXT_ENCODER_PREFIX)}}, path)
    checkpoint = StableDiffusionCheckpoint(path)
    checkpoint.vae(VAE_PARAMS, SCALE_FACTOR)  # the other parts are still there
    expected = sorted(extract_part(sd_state_dict, TEXT_ENCODER_PREFIX))
    assert len(expected) == 42  # below the listing's limit of 50: every name is shown
    with pytest.raises(CheckpointError) as error:
        checkpoint.text_encoder(TEXT_PARAMS)
    message = str(error.value)
    assert message.startswith(f"text encoder of {path} (prefix 'cond_stage_model.')")
    assert f"missing ({len(expected)}): {', '.join(expected)}" in message


def test_a_part_of_another_configuration_lists_the_differences(sd_file, sd_state_dict):
    """A config that does not match the file (two residual blocks per level where the file has one)."""
    bigger = {**TINY_VAE, "num_res_blocks": 2}
    expected_missing = sorted(set(AutoencoderKL(bigger, 4).state_dict()) - set(extract_part(sd_state_dict, VAE_PREFIX)))
    assert expected_missing
    with pytest.raises(CheckpointError) as error:
        StableDiffusionCheckpoint(sd_file).vae({"embed_dim": 4, "ddconfig": bigger}, SCALE_FACTOR)
    message = str(error.value)
    assert f"VAE of {sd_file}" in message
    assert f"missing ({len(expected_missing)}): {', '.join(expected_missing[:50])}" in message
    assert "unexpected" not in message and "shape mismatch" not in message  # only what differs is listed


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
    with pytest.raises(CheckpointError, match="refused"):
        StableDiffusionCheckpoint(path)
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


# ---- training checkpoints: UNet weights as safetensors ---------------------------------------------------


def unet_state():
    torch.manual_seed(1)
    state = UNetModel(**TINY_UNET).state_dict()
    state["half_copy"] = state["out.2.weight"].half()  # dtypes are kept
    state["transposed"] = state["input_blocks.0.0.weight"].flatten(1).t()  # not contiguous
    return state


METADATA = {"step": 3, "samples_seen": 24, "seed": 2**40 + 1, "global_batch": 8, "lr": 1.25e-4,
            "note": "warm-up \u2713", "shape": [1, 2], "extra": {"a": None}}


def test_unet_weights_round_trip_with_their_metadata(tmp_path):
    state = unet_state()
    path = tmp_path / "checkpoints" / "step_00000003.safetensors"
    save_unet(path, state, METADATA)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # written atomically: no temporary left
    loaded, metadata = load_unet(path)
    assert metadata == METADATA and type(metadata["step"]) is int and type(metadata["lr"]) is float
    assert loaded.keys() == state.keys()
    for name, tensor in state.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with safe_open(str(path), framework="pt") as f:  # a plain safetensors file: metadata as JSON strings
        assert {key: json.loads(value) for key, value in f.metadata().items()} == METADATA
    assert load_state_dict_file(path).keys() == state.keys()
    unet = UNetModel(**TINY_UNET)
    unet.load_state_dict({k: v for k, v in loaded.items() if k not in ("half_copy", "transposed")}, strict=True)


def test_unet_file_with_foreign_metadata_is_named(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"format": "pt"})  # not JSON
    with pytest.raises(CheckpointError, match=re.escape(str(path)) + ".*metadata"):
        load_unet(path)


def cut(path, size, into):
    into.write_bytes(path.read_bytes()[:size])
    return into


def test_truncated_safetensors_is_an_error_naming_the_file(tmp_path):
    path = tmp_path / "step_00000003.safetensors"
    save_unet(path, unet_state(), METADATA)
    size = path.stat().st_size
    for keep in (0, 7, 100, size // 2, size - 1):  # in the header length, the header, the data, the last byte
        broken = cut(path, keep, tmp_path / f"cut_{keep}.safetensors")
        for load in (load_unet, load_state_dict_file):
            with pytest.raises(CheckpointError, match=re.escape(str(broken)) + ": truncated or corrupt"):
                load(broken)


def test_truncated_pt_is_an_error_naming_the_file(tmp_path, sd_state_dict):
    path = tmp_path / "tiny.pt"
    torch.save({"state_dict": sd_state_dict}, path)
    size = path.stat().st_size
    # empty, too short for the zip magic (then read as a legacy pickle), in the zip header, in the tensor
    # data (torch's reader fails with OSError EINVAL there), the last byte
    for keep in (0, 2, 100, size // 2, size - 1):
        broken = cut(path, keep, tmp_path / f"cut_{keep}.pt")
        with pytest.raises(CheckpointError, match=re.escape(str(broken))):
            load_state_dict_file(broken)
        with pytest.raises(CheckpointError, match=re.escape(str(broken))):
            StableDiffusionCheckpoint(broken)
    with pytest.raises(CheckpointError, match=re.escape(str(tmp_path / "missing.pt"))):
        load_state_dict_file(tmp_path / "missing.pt")
