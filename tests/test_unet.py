"""The UNet against the MLPerf reference: golden output, full-size names/shapes, init, options."""

import math

import pytest
import torch

from sdcore.attention import SpatialTransformer, set_attention_backend
from sdcore.unet import ResBlock, UNetModel, timestep_embedding

UNET_PREFIX = "model.diffusion_model."

# unet_config.params of the MLPerf reference yaml (configs/train_*.yaml), verbatim.
SD2_UNET_PARAMS = {
    "use_checkpoint": False, "use_fp16": True, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "model_channels": 320, "attention_resolutions": [4, 2, 1], "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "use_spatial_transformer": True,
    "use_linear_in_transformer": True, "transformer_depth": 1, "context_dim": 1024, "legacy": False,
}


@pytest.fixture(scope="module")
def golden(reference):
    return reference.golden("unet")


def golden_model(golden, **overrides) -> UNetModel:
    model = UNetModel(**{**golden["config"], **overrides})
    model.load_state_dict(golden["state_dict"], strict=True)
    return model


@pytest.mark.parametrize("backend", ["math", "sdpa"])
def test_golden_output_matches_reference(golden, backend):
    torch.manual_seed(0)
    model = golden_model(golden, attention_backend=backend).eval()
    with torch.no_grad():
        out = model(golden["x"], golden["t"], golden["context"])
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, golden["out"], atol=1e-5, rtol=0)


def test_state_dict_names_in_reference_order(golden):
    assert list(UNetModel(**golden["config"]).state_dict()) == list(golden["state_dict"])


def test_full_size_matches_checkpoint_names_shapes_and_count(reference):
    tensors = reference.sd2_tensors()["tensors"]
    expected = {name[len(UNET_PREFIX):]: list(shape) for name, shape in tensors.items()
                if name.startswith(UNET_PREFIX)}
    with torch.device("meta"):
        model = UNetModel(**SD2_UNET_PARAMS)
    assert {name: list(t.shape) for name, t in model.state_dict().items()} == expected
    assert len(expected) == 686
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params / 1e6 - 865.9) <= 0.05


def test_timestep_embedding_is_cos_then_sin():
    t = torch.tensor([0, 5, 999])
    emb = timestep_embedding(t, 8)
    freqs = torch.tensor([math.exp(-math.log(10000) * i / 4) for i in range(4)])
    args = t[:, None].float() * freqs
    torch.testing.assert_close(emb, torch.cat([args.cos(), args.sin()], dim=1))


def test_fresh_model_zero_initialises_like_reference(golden):
    model = UNetModel(**golden["config"])
    zero = [model.out[2]]
    zero += [m.out_layers[3] for m in model.modules() if isinstance(m, ResBlock)]
    zero += [m.proj_out for m in model.modules() if isinstance(m, SpatialTransformer)]
    assert len(zero) == 1 + 22 + 16
    for module in zero:
        assert not module.weight.any() and not module.bias.any()
    assert model.input_blocks[0][0].weight.std() > 0
    out = model(golden["x"], golden["t"], golden["context"])
    assert not out.any()


def test_resblock_norms_use_16_groups_in_fp32(golden):
    model = golden_model(golden)
    norm = model.input_blocks[1][0].in_layers[0]
    assert norm.num_groups == 16 and norm.eps == 1e-5
    assert model.out[0].num_groups == 16
    transformer_norm = model.input_blocks[1][1].norm
    assert transformer_norm.num_groups == 32 and transformer_norm.eps == 1e-6
    x = torch.randn(2, 32, 4, 4).to(torch.bfloat16)
    expected = torch.nn.functional.group_norm(x.float(), 16, norm.weight, norm.bias, 1e-5)
    assert torch.equal(norm(x), expected.to(torch.bfloat16))


def test_gradient_checkpointing_gives_identical_gradients(golden):
    grads = []
    for use_checkpoint in (False, True):
        model = golden_model(golden, use_checkpoint=use_checkpoint)
        model(golden["x"], golden["t"], golden["context"]).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(grads[1], grads[0], atol=1e-7, rtol=0)


@pytest.mark.parametrize("option", [
    {"use_scale_shift_norm": True}, {"num_classes": 10}, {"resblock_updown": True},
    {"use_spatial_transformer": False}, {"dims": 3}, {"attention_backend": "flash"},
])
def test_unsupported_reference_options_are_rejected(golden, option):
    with pytest.raises(ValueError):
        UNetModel(**{**golden["config"], **option})


def test_set_attention_backend_switches_every_attention(golden):
    model = UNetModel(**golden["config"])
    assert set_attention_backend(model, "sdpa") == 32
    with pytest.raises(ValueError):
        set_attention_backend(model, "xformers")
