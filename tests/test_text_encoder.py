"""OpenCLIP text encoder (penultimate + ln_final) against golden outputs and the SD2 checkpoint names."""

import socket

import open_clip
import pytest
import torch

from sdcore.text_encoder import FrozenOpenCLIPText



@pytest.fixture(scope="module")
def golden(reference):
    torch.set_num_threads(1)
    data = reference.golden("text_encoder")
    encoder = FrozenOpenCLIPText.from_clip_config(data["open_clip_config"])
    encoder.model.load_state_dict(data["state_dict"], strict=True)
    return encoder, data


def test_tokens_match_reference(golden):
    encoder, data = golden
    assert torch.equal(encoder.tokenize(data["prompts"]), data["tokens"])


def test_penultimate_output_matches_reference(golden):
    encoder, data = golden
    with torch.no_grad():
        out = encoder(data["tokens"])
    torch.testing.assert_close(out, data["penultimate"], atol=1e-5, rtol=0)
    torch.testing.assert_close(encoder.encode(data["prompts"]), data["penultimate"], atol=1e-5, rtol=0)


def test_full_size_text_encoder_has_the_checkpoint_names_and_shapes(reference):
    tensors = reference.sd2_tensors()["tensors"]
    prefix = "cond_stage_model."
    expected = {name[len(prefix):]: shape for name, shape in tensors.items() if name.startswith(prefix)}
    with torch.device("meta"):
        encoder = FrozenOpenCLIPText("ViT-H-14")
    assert {name: list(t.shape) for name, t in encoder.state_dict().items()} == expected
    assert round(sum(p.numel() for p in encoder.parameters()) / 1e6, 1) == 354.0


def test_tiny_demo_arch_is_registered_and_works_offline(monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the text encoder tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    assert "sdcore-tiny-clip" in open_clip.list_models()
    encoder = FrozenOpenCLIPText("sdcore-tiny-clip")
    context = encoder.encode(["a red circle above a blue square", ""])
    assert context.shape == (2, 77, 48)
    assert not hasattr(encoder.model, "visual")


def test_encoder_is_frozen():
    encoder = FrozenOpenCLIPText("sdcore-tiny-clip")
    encoder.train()
    assert not encoder.training and not encoder.model.training
    assert not any(p.requires_grad for p in encoder.parameters())


def test_max_length_must_match_the_model():
    with pytest.raises(ValueError, match="context length"):
        FrozenOpenCLIPText("sdcore-tiny-clip", max_length=64)
