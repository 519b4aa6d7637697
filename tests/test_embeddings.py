"""Precomputed text embeddings (sdcore.embeddings): the side store, its lookup conditioner, the data
stream's sample keys, and training with them bitwise equal to encoding online."""

import os
import subprocess
import sys

import pytest
import torch
import webdataset as wds
import yaml

from sdcore.data import LatentShardSource, SampleCaptions, _shard_samples, read_latent_index
from sdcore.embeddings import (EmbeddingError, PrecomputedTextConditioner, conditioner_factory, encode_for_config,
                               side_file_name)
from sdcore.training import trainer
from train_fixtures import assert_same_weights, checkpoint, deterministic_cpu, factories, losses, tiny_config, \
    write_latent_shards

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_CLIP = "sdcore-tiny-clip"


@pytest.fixture(autouse=True)
def one_thread():
    with deterministic_cpu(deterministic=False):
        yield


def sd_checkpoint_with_text_encoder(path, arch=TINY_CLIP):
    """An SD checkpoint file holding only a random tiny text encoder (cond_stage_model.*)."""
    from safetensors.torch import save_file

    from sdcore.text_encoder import FrozenOpenCLIPText

    torch.manual_seed(0)
    encoder = FrozenOpenCLIPText(arch)
    save_file({f"cond_stage_model.{k}": v.contiguous() for k, v in encoder.state_dict().items()}, str(path))
    return path


def run_config(tmp_path, precision="fp32"):
    config = tiny_config(str(tmp_path), eval_mode="offline", precision=precision, checkpoint_every_samples=8,
                         max_samples=16)
    config["model"]["params"]["unet_config"]["params"]["context_dim"] = 48  # width of sdcore-tiny-clip
    return config


@pytest.fixture
def store(tmp_path):
    """(config, latent index, SD checkpoint, embeddings index) of a small encoded store."""
    config = run_config(tmp_path)
    latents = write_latent_shards(config, num_shards=2, per_shard=6)
    sd = sd_checkpoint_with_text_encoder(tmp_path / "sd.safetensors")
    out = tmp_path / "embeddings" / "embeddings.json"
    encode_for_config(config, latents, sd, out)
    return config, latents, sd, out


def stream_batches(latents, n, batch_size=4):
    shards, samples = read_latent_index(latents)
    source = LatentShardSource(shards, batch_size=batch_size, micro_batches_per_step=1, block_steps=3,
                               shuffle_buffer=8, seed=42, rank=0, num_samples=samples)
    stream = source.micro_batches(0)
    return [next(stream) for _ in range(n)]


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_with_precomputed_embeddings_is_bitwise_equal_to_online_encoding(tmp_path, precision):
    """Same data, same seed: the losses and the weights of every checkpoint are identical, bit for bit,
    whether the trainer runs the text encoder or looks the contexts up."""
    config = run_config(tmp_path, precision)
    latents = write_latent_shards(config)
    sd = sd_checkpoint_with_text_encoder(tmp_path / "sd.safetensors")
    inputs = trainer.TrainInputs(latents=latents, sd_checkpoint=sd)
    evaluator = factories().evaluator
    online = trainer.Factories(data=trainer.latent_source, conditioner=trainer.text_conditioner, evaluator=evaluator)
    assert trainer.main(config, tmp_path / "online", inputs=inputs, factories=online) == 0

    index = tmp_path / "embeddings" / "embeddings.json"
    encode_for_config(config, latents, sd, index)
    lookup = trainer.Factories(data=trainer.latent_source, conditioner=conditioner_factory(index), evaluator=evaluator)
    assert trainer.main(config, tmp_path / "precomputed", inputs=trainer.TrainInputs(latents=latents),
                        factories=lookup) == 0

    online_losses, precomputed_losses = losses(tmp_path / "online"), losses(tmp_path / "precomputed")
    assert len(online_losses) == 4
    assert [r["loss"] for r in precomputed_losses] == [r["loss"] for r in online_losses]
    for step in (2, 4):
        assert_same_weights(checkpoint(tmp_path / "precomputed", step)[0], checkpoint(tmp_path / "online", step)[0])


def test_lookup_equals_the_encoder_on_the_stream(store):
    config, latents, sd, index = store
    from sdcore.checkpoint import StableDiffusionCheckpoint
    from sdcore.data import FrozenTextConditioner

    encoder = FrozenTextConditioner(StableDiffusionCheckpoint(sd).text_encoder(
        config["model"]["params"]["cond_stage_config"]["params"]))
    conditioner = PrecomputedTextConditioner(index, precision="fp32", batch_size=4)
    for batch in stream_batches(latents, 5):
        assert torch.equal(conditioner(batch.captions, torch.device("cpu")),
                           encoder(batch.captions, torch.device("cpu")))


def test_stream_names_each_sample_in_webdataset_order(store):
    """The fast shard reader yields webdataset's samples in webdataset's order, and every batch's
    captions carry their samples' keys and shards."""
    _, latents, _, _ = store
    shards, _ = read_latent_index(latents)
    ours = list(_shard_samples([{"url": s} for s in shards]))
    theirs = list(wds.tariterators.tarfile_samples([{"url": s} for s in shards]))
    assert [(s["__key__"], s["__url__"], s["txt"], s["npy"]) for s in ours] == \
        [(s["__key__"], s["__url__"], s["txt"], s["npy"]) for s in theirs]
    for batch in stream_batches(latents, 4):
        assert isinstance(batch.captions, SampleCaptions) and batch.keys == batch.captions.keys
        assert batch.captions == [f"caption {key}" for key in batch.keys]  # the fixture's captions name their keys
        assert all(shard in shards for shard in batch.shards)


def test_missing_embedding_file_fails_naming_it(store):
    _, _, _, index = store
    victim = sorted(index.parent.glob("*.ctx.safetensors"))[0]
    victim.unlink()
    with pytest.raises(EmbeddingError, match=f"{victim}: embedding file missing"):
        PrecomputedTextConditioner(index)
    with pytest.raises(EmbeddingError, match="embeddings index missing"):
        PrecomputedTextConditioner(index.parent / "nothing.json")


@pytest.mark.parametrize("damage", ["truncated", "flipped_byte", "garbage"])
def test_corrupt_embedding_file_fails_naming_it(store, damage):
    _, latents, _, index = store
    conditioner = PrecomputedTextConditioner(index)
    batch = stream_batches(latents, 1)[0]
    key, shard = batch.keys[0], batch.shards[0]
    victim = index.parent / side_file_name(os.path.relpath(shard, os.path.dirname(latents)))
    data = bytearray(victim.read_bytes())
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "flipped_byte":  # one bit inside the context of the batch's first sample
        header = 8 + int.from_bytes(data[:8], "little")
        row = int(key[-4:])  # the fixture's keys are shard + row
        data[header + row * 77 * 48 * 4 + 1001] ^= 0x10
    else:
        data = bytearray(b"not a safetensors file" * 10)
    victim.write_bytes(bytes(data))
    with pytest.raises(EmbeddingError, match=f"{victim}: corrupt embedding file"):
        conditioner(batch.captions, torch.device("cpu"))


def test_store_made_for_other_settings_or_shards_is_refused(store, tmp_path):
    config, latents, _, index = store
    with pytest.raises(EmbeddingError, match="encoded with precision 'fp32', but the run uses 'bf16'"):
        PrecomputedTextConditioner(index, precision="bf16")
    with pytest.raises(EmbeddingError, match="encoded with batch_size 4, but the run uses 8"):
        PrecomputedTextConditioner(index, batch_size=8)
    conditioner = PrecomputedTextConditioner(index)
    batch = stream_batches(latents, 1)[0]
    with pytest.raises(EmbeddingError, match="need captions that name their samples"):
        conditioner(list(batch.captions), torch.device("cpu"))
    other = SampleCaptions(["another caption"] + batch.captions[1:], batch.keys, batch.shards)
    with pytest.raises(EmbeddingError, match="encoded from another caption"):
        conditioner(other, torch.device("cpu"))
    unknown = SampleCaptions(batch.captions, batch.keys, [str(tmp_path / "elsewhere.tar")] * len(batch))
    with pytest.raises(EmbeddingError, match="lists no embeddings for shard"):
        conditioner(unknown, torch.device("cpu"))


@pytest.mark.slow
def test_command_line_writes_the_index_last_and_keeps_finished_files(store, tmp_path):
    config, latents, sd, index = store
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config))
    out = tmp_path / "cli" / "embeddings.json"
    script = os.path.join(REPO, "workflow_scripts", "encode_text_embeddings.py")
    command = [sys.executable, script, "--latents", str(latents), "--sd-checkpoint", str(sd), "--config",
               str(config_file), "--out", str(out), "--device", "cpu"]
    subprocess.run(command + ["--shards", "0"], check=True, capture_output=True, text=True)
    assert not out.exists() and len(list(out.parent.glob("*.ctx.safetensors"))) == 1
    first = next(out.parent.glob("*.ctx.safetensors"))
    mtime = first.stat().st_mtime_ns
    subprocess.run(command, check=True, capture_output=True, text=True)
    assert out.exists() and len(list(out.parent.glob("*.ctx.safetensors"))) == 2
    assert first.stat().st_mtime_ns == mtime  # kept, not encoded again
    from safetensors.torch import load_file

    for name in (p.name for p in out.parent.glob("*.ctx.safetensors")):
        assert torch.equal(load_file(out.parent / name)["contexts"], load_file(index.parent / name)["contexts"])
