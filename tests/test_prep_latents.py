"""sdcore.prep.latents on hand-made shards: batching, skipped images, corrupt tars, resume."""

import io
import json
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from prep_helpers import tiny_vae_checkpoint
from sdcore.checkpoint import CheckpointError
from sdcore.prep import PrepError
from sdcore.prep.latents import encode_manifest, iter_tar_samples

torch.set_num_threads(1)
IMAGE_SIZE = 32


def reference_moments(vae, image_bytes):
    """The reference preprocessing written out independently, then quant_conv(encoder(x))."""
    x = transforms.ToTensor()(Image.open(io.BytesIO(image_bytes)).convert("RGB"))
    x = transforms.Resize(IMAGE_SIZE, interpolation=transforms.InterpolationMode.BICUBIC, antialias=False)(x)
    x = transforms.CenterCrop(IMAGE_SIZE)(x)
    with torch.no_grad():
        return vae.moments(x[None])[0].numpy()


def jpeg(h, w, seed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def read_shard(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return tiny_vae_checkpoint(tmp_path_factory.mktemp("vae"))


@pytest.fixture
def shards(tmp_path):
    """Two image shards: 5 good samples (varied shapes) + 1 undecodable image, and 2 good samples."""
    src = tmp_path / "images"
    src.mkdir()
    sizes = [(40, 40), (48, 36), (33, 70), (64, 64), (50, 45), (37, 90), (90, 40)]
    samples = [(f"{i:09d}", {"jpg": jpeg(h, w, i), "txt": f"caption {i}".encode(),
                             "json": json.dumps({"key": f"{i:09d}"}).encode()}) for i, (h, w) in enumerate(sizes)]
    samples.insert(2, ("000000099", {"jpg": b"\xff\xd8garbage", "txt": b"broken", "json": b"{}"}))
    write_shard(src / "00000.tar", samples[:6])
    write_shard(src / "00001.tar", samples[6:])
    (src / "manifest.json").write_text(json.dumps({"shards": ["00000.tar", "00001.tar"]}))
    return src, dict(samples)


def test_moments_match_reference_preprocessing(tmp_path, model, shards):
    vae, ckpt, _, params = model
    src, samples = shards
    out = tmp_path / "latents"
    manifest = encode_manifest(src / "manifest.json", out, out / "manifest.json", ckpt, params,
                               image_size=IMAGE_SIZE, batch_size=3, device="cpu", workers=2)
    assert manifest["shards"] == ["00000.tar", "00001.tar"]
    assert manifest["samples"] == 7 and manifest["failed"] == 1
    assert manifest["latent_shape"] == [8, 4, 4]
    report = json.loads((out / "00000_report.json").read_text())
    assert report["samples_in"] == 6 and report["encoded"] == 5 and list(report["skipped"]) == ["000000099"]
    for shard in manifest["shards"]:
        members = read_shard(out / shard)
        assert not any(name.endswith(".jpg") for name in members)
        for name, data in members.items():
            key, ext = name.split(".")
            if ext == "npy":
                moments = np.load(io.BytesIO(data))
                assert moments.dtype == np.float32 and moments.shape == (8, 4, 4)
                np.testing.assert_allclose(moments, reference_moments(vae, samples[key]["jpg"]), atol=1e-5)
            else:
                assert data == samples[key][ext]
    assert sum(name.endswith(".npy") for s in manifest["shards"] for name in read_shard(out / s)) == 7


def test_rerun_keeps_finished_shards(tmp_path, model, shards):
    _, ckpt, _, params = model
    src, _ = shards
    out = tmp_path / "latents"
    args = (src / "manifest.json", out, out / "manifest.json", ckpt, params)
    encode_manifest(*args, image_size=IMAGE_SIZE, batch_size=4, device="cpu")
    before = (out / "00000.tar").stat().st_mtime_ns
    encode_manifest(*args, image_size=IMAGE_SIZE, batch_size=4, device="cpu")
    assert (out / "00000.tar").stat().st_mtime_ns == before
    encode_manifest(*args, image_size=16, batch_size=4, device="cpu")  # another size: redone
    assert np.load(io.BytesIO(read_shard(out / "00000.tar")["000000000.npy"])).shape == (8, 2, 2)


def test_truncated_tar_is_named(tmp_path, model, shards):
    _, ckpt, _, params = model
    src, _ = shards
    data = (src / "00001.tar").read_bytes()
    (src / "00001.tar").write_bytes(data[:700])  # inside the first member's data
    out = tmp_path / "latents"
    with pytest.raises(PrepError, match=re.escape(str(src / "00001.tar"))):
        encode_manifest(src / "manifest.json", out, out / "manifest.json", ckpt, params,
                        image_size=IMAGE_SIZE, batch_size=2, device="cpu")
    assert not (out / "manifest.json").exists() and not (out / "00001.tar").exists()


def test_shard_shorter_than_img2dataset_stats_is_an_error(tmp_path, model, shards):
    _, ckpt, _, params = model
    src, _ = shards
    (src / "00001_stats.json").write_text(json.dumps({"successes": 3}))
    out = tmp_path / "latents"
    with pytest.raises(PrepError, match="00001.tar.*holds 2 samples but img2dataset stored 3"):
        encode_manifest(src / "manifest.json", out, out / "manifest.json", ckpt, params,
                        image_size=IMAGE_SIZE, batch_size=2, device="cpu")


def test_checkpoint_without_the_vae_names_it_and_the_missing_tensors(tmp_path, model, shards):
    """The VAE loads strictly (sdcore.checkpoint.StableDiffusionCheckpoint): nothing is encoded with a
    checkpoint that lacks it, and the error names the file and the tensors."""
    _, _, _, params = model
    src, _ = shards
    ckpt = tmp_path / "no_vae.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}}, ckpt)
    out = tmp_path / "latents"
    with pytest.raises(CheckpointError, match=r"VAE of .*no_vae\.ckpt.*missing \(\d+\): decoder\.conv_in\.bias"):
        encode_manifest(src / "manifest.json", out, out / "manifest.json", ckpt, params,
                        image_size=IMAGE_SIZE, batch_size=2, device="cpu")
    assert not (out / "manifest.json").exists() and not (out / "00000.tar").exists()


def test_iter_tar_samples_groups_by_key_in_key_order(tmp_path):
    write_shard(tmp_path / "s.tar", [("a/002", {"txt": b"3"}), ("a/001", {"jpg": b"1"}), ("a/003", {"txt": b"4"}),
                                     ("a/001", {"json": b"2"})])
    samples = list(iter_tar_samples(tmp_path / "s.tar"))
    assert [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")}) for s in samples] == [
        ("a/001", {"jpg": b"1", "json": b"2"}), ("a/002", {"txt": b"3"}), ("a/003", {"txt": b"4"})]


def test_latent_shard_does_not_depend_on_the_fetch_order(tmp_path, model, shards):
    """img2dataset stores samples as their downloads finish: the same rows fetched twice, in another
    order, must give the same latent shard, or a seed's training stream would change with the fetch."""
    _, ckpt, _, params = model
    src, samples = shards
    reordered = tmp_path / "reordered"
    reordered.mkdir()
    keys = ["000000003", "000000000", "000000099", "000000004", "000000001", "000000002"]
    write_shard(reordered / "00000.tar", [(key, samples[key]) for key in keys])
    (reordered / "manifest.json").write_text(json.dumps({"shards": ["00000.tar"]}))
    names = []
    for images in (src, reordered):
        out = tmp_path / f"latents_{images.name}"
        encode_manifest(images / "manifest.json", out, out / "manifest.json", ckpt, params,
                        image_size=IMAGE_SIZE, batch_size=4, device="cpu")
        with tarfile.open(out / "00000.tar") as tar:
            names.append([(m.name, tar.extractfile(m).read()) for m in tar.getmembers()])
    assert [name for name, _ in names[0]][:3] == ["000000000.npy", "000000000.txt", "000000000.json"]
    assert names[0] == names[1]
