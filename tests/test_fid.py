"""sdcore.fid against pytorch-fid itself (the reference's FID code): features, file pipeline, Fréchet distance.

pytorch-fid (test-only dependency) is built from random weights saved in the layout of
pt_inception-2015-12-05-6726825d.pth; its weight download is replaced by a loader of that file.
"""

import io
import math
import os
import re
import time
import warnings

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

import pytorch_fid.fid_score as pf_score
import pytorch_fid.inception as pf_inception
from sdcore import fid
from sdcore.checkpoint import CheckpointError

FEATURE_RTOL = 1e-4
# scipy >= 1.17 deprecates the `disp` argument pytorch-fid passes to sqrtm; not our concern here.
pytestmark = pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")


def relative_error(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    return float(np.abs(ours - theirs).max() / np.abs(theirs).max())


def random_fid_inception_state(seed=0) -> dict:
    """Seeded weights in pytorch-fid's layout, scaled so that features stay O(1) and depend on the input.

    BatchNorm running statistics are non-trivial (mean != 0, var != 1), so eval-mode BN is exercised.
    """
    layout = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None,
                                             init_weights=False).state_dict()
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, value in layout.items():
        shape = value.shape
        if name.endswith("num_batches_tracked"):
            state[name] = value.clone()
        elif value.dim() == 4:
            state[name] = torch.randn(shape, generator=generator) * math.sqrt(2.0 / value[0].numel())
        elif name.endswith(("running_var", "bn.weight")):
            state[name] = 0.5 + torch.rand(shape, generator=generator)
        elif name.endswith("running_mean"):
            state[name] = 0.1 * torch.randn(shape, generator=generator)
        elif name.endswith("bn.bias"):
            state[name] = 0.05 * torch.randn(shape, generator=generator)
        else:  # fc
            state[name] = 0.01 * torch.randn(shape, generator=generator)
    return state


@pytest.fixture(scope="module")
def weights_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(random_fid_inception_state(), path)
    return path


@pytest.fixture(scope="module")
def pytorch_fid_model(weights_path):
    """pytorch-fid's own InceptionV3([3]) (FID variant); its URL download replaced by our file."""
    urls = []

    def load_from_file(url, *args, **kwargs):
        urls.append(url)
        return torch.load(weights_path, map_location="cpu", weights_only=True)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pf_inception, "load_state_dict_from_url", load_from_file)
        model = pf_inception.InceptionV3([pf_inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]])  # strict load
    assert urls == [pf_inception.FID_WEIGHTS_URL]  # the reference's weights, by name
    assert pf_inception.FID_WEIGHTS_URL.endswith("pt_inception-2015-12-05-6726825d.pth")
    return model.eval()


@pytest.fixture(scope="module")
def extractor(weights_path):
    return fid.InceptionV3Features(weights_path, "cpu")


def images(batch, height, width, seed=0) -> torch.Tensor:
    """Float images in [0, 1] with structure (gradients, a bright box) and noise, so features differ."""
    generator = torch.Generator().manual_seed(seed)
    ys, xs = torch.linspace(0, 1, height).view(1, -1, 1), torch.linspace(0, 1, width).view(1, 1, -1)
    out = []
    for _ in range(batch):
        a, b = torch.rand(3, 1, 1, generator=generator), torch.rand(3, 1, 1, generator=generator)
        image = (a * ys + b * xs) / 2 + 0.3 * torch.rand(3, height, width, generator=generator)
        top, left = int(torch.randint(0, height // 2, (1,), generator=generator)), int(
            torch.randint(0, width // 2, (1,), generator=generator))
        image[:, top:top + height // 3, left:left + width // 3] += 0.4
        out.append(image.clamp(0, 1))
    return torch.stack(out)


def pytorch_fid_features(model, batch) -> np.ndarray:
    with torch.no_grad():
        return model(batch)[0].squeeze(3).squeeze(2).double().numpy()


# ---- Inception features ------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 64, 64), (3, 512, 512), (2, 299, 299), (2, 480, 640)])
def test_features_equal_pytorch_fid(shape, extractor, pytorch_fid_model):
    batch = images(*shape, seed=shape[1])
    ours = extractor(batch)
    assert ours.shape == (shape[0], 2048) and ours.dtype == torch.float32
    theirs = pytorch_fid_features(pytorch_fid_model, batch)
    error = relative_error(ours.double().numpy(), theirs)
    print(f"\n{shape}: max relative feature error {error:.3g}")
    assert error <= FEATURE_RTOL
    if shape[0] > 1:  # the comparison means something only if features depend on the image
        assert theirs.std(axis=0).max() > 0.01 * np.abs(theirs).max()


def test_a_different_front_end_is_detected(weights_path, extractor, pytorch_fid_model):
    """torch-fidelity's own front end (uint8, TF1 resize, (x-128)/128) on the same network and file differs
    far beyond the tolerance: the feature test can tell front ends apart. The file's key names load strictly
    into torch-fidelity's extractor too (same names as pytorch-fid's)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    fidelity = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=buffer)
    batch = images(2, 512, 512, seed=3)
    as_uint8 = (batch * 255).round().to(torch.uint8)
    theirs = pytorch_fid_features(pytorch_fid_model, as_uint8.float() / 255)
    (fidelity_features,) = fidelity(as_uint8)
    assert relative_error(extractor(as_uint8.float() / 255).numpy(), theirs) <= FEATURE_RTOL
    assert relative_error(fidelity_features.numpy(), theirs) > 30 * FEATURE_RTOL


def test_features_are_float32_under_autocast_and_for_half_inputs(extractor):
    batch = images(1, 64, 64, seed=9)
    expected = extractor(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(extractor(batch), expected)
    half = batch.half()
    assert torch.equal(extractor(half), extractor(half.float()))
    extractor.train()  # BatchNorm keeps the file's running statistics
    assert not extractor.Mixed_7c.branch_pool.bn.training and torch.equal(extractor(batch), expected)


def test_forward_rejects_wrong_inputs(extractor):
    with pytest.raises(ValueError, match="float images"):
        extractor((images(1, 32, 32) * 255).to(torch.uint8))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        extractor(images(1, 32, 32) * 2 - 1)
    with pytest.raises(ValueError, match="float images"):
        extractor(images(1, 32, 32)[:, :1])


def test_weights_that_are_not_pytorch_fid_inception_name_the_file(tmp_path, weights_path):
    state = torch.load(weights_path, map_location="cpu", weights_only=True)
    imagenet = dict(state, **{"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    missing = {k: v for k, v in state.items() if not k.startswith("Mixed_7c.")}
    for name, bad in [("imagenet.pth", imagenet), ("missing.pth", missing)]:
        torch.save(bad, tmp_path / name)
        with pytest.raises(CheckpointError, match=f"{name}.*not a pytorch-fid Inception"):
            fid.InceptionV3Features(tmp_path / name)
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        fid.InceptionV3Features(tmp_path / "garbage.pth")
    with pytest.raises(CheckpointError, match="sha1"):
        fid.InceptionV3Features(weights_path, sha1=fid.INCEPTION_WEIGHTS_SHA1)  # random weights: not the real file
    assert fid.InceptionV3Features(weights_path, sha1=fid.file_sha1(weights_path)) is not None


# ---- reference-side path: coco-split-resize.py, then pytorch-fid's ImagePathDataset -------------------------


@pytest.fixture(scope="module")
def coco_like(tmp_path_factory):
    """COCO-like JPEG sources (RGB and grayscale, several aspect ratios) and their resized copies."""
    root = tmp_path_factory.mktemp("coco")
    rng = np.random.default_rng(0)
    sources = []
    for index, (width, height, mode) in enumerate([(640, 480, "RGB"), (427, 640, "RGB"), (500, 375, "L"),
                                                   (640, 426, "RGB"), (512, 512, "RGB")]):
        base = images(1, height, width, seed=100 + index)[0].permute(1, 2, 0).numpy()
        pixels = np.clip(base * 255 + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels).convert(mode)
        path = root / "val2014" / f"COCO_val2014_{index + 1:012d}.jpg"
        path.parent.mkdir(exist_ok=True)
        image.save(path, quality=95)
        sources.append(path)
    resized = [root / "resized" / src.name for src in sources]
    for src, dst in zip(sources, resized):
        fid.resize_coco_image(src, dst)
    return sources, resized


def test_resize_is_pil_bicubic_then_jpeg_q75(coco_like, tmp_path):
    sources, resized = coco_like
    assert sorted(p.name for p in resized[0].parent.iterdir()) == sorted(p.name for p in resized)  # no temp left
    for src, ours in zip(sources, resized):
        independent = tmp_path / src.name
        with Image.open(src) as image:
            mode = image.mode
            image.resize((512, 512), Image.Resampling.BICUBIC).save(independent, format="JPEG", quality=75)
        assert ours.read_bytes() == independent.read_bytes()
        with Image.open(ours) as a, Image.open(independent) as b:
            assert a.format == "JPEG" and a.size == (512, 512) and a.mode == mode  # grayscale is kept
            assert np.array_equal(np.asarray(a), np.asarray(b))
    with Image.open(sources[0]) as image:  # quality 75 really is what was written: not, e.g., 95
        image.resize((512, 512), Image.Resampling.BICUBIC).save(tmp_path / "q95.jpg", quality=95)
    assert (tmp_path / "q95.jpg").read_bytes() != resized[0].read_bytes()


def test_file_features_equal_pytorch_fid_dataset(coco_like, extractor, pytorch_fid_model):
    _, resized = coco_like
    ours = fid.image_file_features(resized, extractor, batch_size=2)  # batches 2, 2, 1
    theirs = pf_score.get_activations(resized, pytorch_fid_model, batch_size=2, dims=2048, device="cpu",
                                      num_workers=0)
    error = relative_error(ours, theirs)
    print(f"\nfile features: max relative error {error:.3g}")
    assert ours.dtype == np.float64 and ours.shape == (5, 2048)
    assert error <= FEATURE_RTOL
    mu, sigma = fid.gaussian_stats(ours)
    ref_mu, ref_sigma = pf_score.calculate_activation_statistics(resized, pytorch_fid_model, batch_size=5,
                                                                 dims=2048, device="cpu", num_workers=0)
    assert relative_error(mu, ref_mu) <= FEATURE_RTOL and relative_error(sigma, ref_sigma) <= 10 * FEATURE_RTOL


def test_file_features_name_the_file_that_breaks_a_batch(coco_like, extractor, tmp_path):
    sources, resized = coco_like
    with pytest.raises(fid.FidError, match=re.escape(str(sources[0]))):
        fid.image_file_features([resized[1], sources[0]], extractor, batch_size=2)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8 not really")
    with pytest.raises(fid.FidError, match="broken.jpg"):
        fid.image_file_features([tmp_path / "broken.jpg"], extractor)


# ---- Fréchet distance ------------------------------------------------------------------------------------


def realistic_features(seed, dims=2048, samples=3000):
    """Two feature sets shaped like Inception pool3: positive means, power-law spectrum (trace ~ 20, smallest
    eigenvalue ~1e-4 after sampling), the second rotated, rescaled and shifted."""
    rng = np.random.default_rng(seed)
    basis_a, _ = np.linalg.qr(rng.standard_normal((dims, dims)))
    basis_b, _ = np.linalg.qr(basis_a + 0.05 * rng.standard_normal((dims, dims)))
    spectrum_a = 2.0 * np.arange(1, dims + 1) ** -0.9
    spectrum_b = spectrum_a * rng.uniform(0.7, 1.4, dims)
    mean_a = rng.uniform(0.2, 0.6, dims)
    mean_b = mean_a + rng.normal(0, 0.08, dims)
    a = mean_a + (rng.standard_normal((samples, dims)) * np.sqrt(spectrum_a)) @ basis_a.T
    b = mean_b + (rng.standard_normal((samples, dims)) * np.sqrt(spectrum_b)) @ basis_b.T
    return a, b


@pytest.fixture(scope="module")
def realistic_stats():
    a, b = realistic_features(0)
    return fid.gaussian_stats(a) + fid.gaussian_stats(b)


@pytest.mark.slow
def test_frechet_distance_equals_pytorch_fid_on_realistic_statistics(realistic_stats):
    start = time.perf_counter()
    ours = fid.frechet_distance(*realistic_stats)
    ours_seconds = time.perf_counter() - start
    start = time.perf_counter()
    theirs = pf_score.calculate_frechet_distance(*realistic_stats)
    theirs_seconds = time.perf_counter() - start
    print(f"\nFID {ours:.9g} vs pytorch-fid {theirs:.9g} (rel {abs(ours - theirs) / theirs:.2g}); "
          f"{ours_seconds:.2f} s vs {theirs_seconds:.2f} s")
    assert 10 < theirs < 1000  # realistic magnitude, not millions
    assert ours == pytest.approx(theirs, rel=1e-6)


def test_frechet_distance_matches_reference_golden(reference):
    data = reference.golden("frechet")
    stats = fid.gaussian_stats(data["features_a"]) + fid.gaussian_stats(data["features_b"])
    assert fid.frechet_distance(*stats) == pytest.approx(data["frechet_distance"], rel=1e-9)


def test_frechet_distance_of_identical_and_shifted_gaussians(realistic_stats):
    mu, sigma = realistic_stats[:2]
    assert fid.frechet_distance(mu, sigma, mu, sigma) == 0.0
    assert fid.frechet_distance(mu, sigma, mu + 0.5, sigma.copy()) == pytest.approx(2048 * 0.25, rel=1e-12)
    # Through the eigenvalue path (covariances not bit-equal): still ~0, relative to Tr(S) ~ 20.
    nearly = sigma * (1 + 1e-12)
    assert abs(fid.frechet_distance(mu, sigma, mu, nearly)) < 1e-6


@pytest.mark.parametrize("samples_a, samples_b", [(100, 100), (100, 400), (400, 100)])
def test_frechet_distance_with_singular_covariances(samples_a, samples_b):
    """Fewer samples than dimensions on one or both sides (d = 256): the exact value, equal to pytorch-fid's
    when scipy's sqrtm of the singular product is finite; offset=1e-6 equals pytorch-fid's eps fallback."""
    dims, eps = 256, 1e-6
    rng = np.random.default_rng(samples_a + 7 * samples_b)
    mu1, s1 = fid.gaussian_stats(rng.standard_normal((samples_a, dims)) ** 2)
    mu2, s2 = fid.gaussian_stats(rng.standard_normal((samples_b, dims)) ** 2 * 1.1 + 0.05)
    ours = fid.frechet_distance(mu1, s1, mu2, s2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        plain = pf_score.calculate_frechet_distance(mu1, s1, mu2, s2)
        offset = np.eye(dims) * eps  # the fallback: eps inside the root only, traces without it
        fallback = pf_score.calculate_frechet_distance(mu1, s1 + offset, mu2, s2 + offset) - 2 * eps * dims
    assert np.isfinite(ours)
    assert ours == pytest.approx(plain, rel=1e-6)
    assert fid.frechet_distance(mu1, s1, mu2, s2, offset=eps) == pytest.approx(fallback, rel=1e-9)
    assert fallback < ours  # the offset lowers the value


def test_frechet_distance_rejects_bad_shapes_and_values():
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="shapes"):
        fid.frechet_distance(mu, sigma, np.zeros(5), np.eye(5))
    with pytest.raises(ValueError, match="shapes"):
        fid.frechet_distance(mu, np.eye(3), mu, np.eye(3))
    with pytest.raises(ValueError, match="non-finite"):
        fid.frechet_distance(mu, sigma, mu, np.full((4, 4), np.nan))


# ---- statistics files ------------------------------------------------------------------------------------


def test_stats_round_trip_and_front_end(tmp_path):
    mu, sigma = fid.gaussian_stats(np.random.default_rng(0).normal(size=(50, 8)))
    path = tmp_path / "stats.npz"
    fid.save_stats(path, mu, sigma)
    assert [p.name for p in tmp_path.iterdir()] == ["stats.npz"]  # no temporary left
    loaded = fid.load_stats(path, front_end=fid.FRONT_END)
    assert np.array_equal(loaded.mu, mu) and np.array_equal(loaded.sigma, sigma)
    assert loaded.front_end == fid.FRONT_END
    with np.load(path) as data:  # what the reference's reader does still works
        assert np.array_equal(data["mu"][:], mu) and str(data[fid.FRONT_END_KEY]) == fid.FRONT_END

    other = tmp_path / "other.npz"
    fid.save_stats(other, mu, sigma, front_end="torch-fidelity-tf1")
    assert fid.load_stats(other).front_end == "torch-fidelity-tf1"
    with pytest.raises(fid.FidError, match="other.npz.*torch-fidelity-tf1"):
        fid.load_stats(other, front_end=fid.FRONT_END)

    published = tmp_path / "val2014_30k_stats.npz"  # as the reference's writer: no front_end key
    np.savez_compressed(published, mu=mu, sigma=sigma)
    assert fid.load_stats(published, front_end=fid.FRONT_END).front_end == fid.FRONT_END


def test_load_stats_errors_name_the_file(tmp_path):
    mu, sigma = np.zeros(4), np.eye(4)
    cases = {
        "no_sigma.npz": lambda p: np.savez(p, mu=mu),
        "wrong_shape.npz": lambda p: np.savez(p, mu=mu, sigma=np.eye(5)),
        "mu_2d.npz": lambda p: np.savez(p, mu=np.zeros((4, 1)), sigma=sigma),
        "text.npz": lambda p: p.write_text("mu sigma"),
        "single.npy": lambda p: np.save(p, mu),
        "truncated.npz": lambda p: (np.savez(p, mu=mu, sigma=sigma), p.write_bytes(p.read_bytes()[:100])),
        "bad_front_end.npz": lambda p: np.savez(p, mu=mu, sigma=sigma, front_end=np.zeros(2)),
    }
    for name, write in cases.items():
        write(tmp_path / name)
        with pytest.raises(fid.FidError, match=name.replace(".", r"\.")):
            fid.load_stats(tmp_path / name)
    with pytest.raises(fid.FidError, match="missing.npz"):
        fid.load_stats(tmp_path / "missing.npz")
    with pytest.raises(fid.FidError, match=r"\['sigma'\]"):
        fid.load_stats(tmp_path / "no_sigma.npz")
    with pytest.raises(fid.FidError, match="out.npz"):
        fid.save_stats(tmp_path / "out.npz", mu, np.eye(3))
    assert not os.path.exists(tmp_path / "out.npz")
