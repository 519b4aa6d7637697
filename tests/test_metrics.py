"""Fréchet distance against the reference, CLIP score semantics, and the safely loaded Inception extractor."""


import numpy as np
import pytest
import torch
import torchvision

from sdcore.checkpoint import CheckpointError
from sdcore.metrics import clip_score, frechet_distance, gaussian_stats, inception_features, load_inception



def test_frechet_distance_matches_reference(reference):
    data = reference.golden("frechet")
    mu_a, sigma_a = gaussian_stats(data["features_a"].numpy())
    mu_b, sigma_b = gaussian_stats(data["features_b"].numpy())
    assert sigma_a.dtype == np.float64 and sigma_a.shape == (64, 64)
    assert frechet_distance(mu_a, sigma_a, mu_b, sigma_b) == pytest.approx(data["frechet_distance"], rel=1e-9)


def test_frechet_distance_of_identical_and_shifted_gaussians():
    features = np.random.default_rng(0).normal(size=(200, 8))
    mu, sigma = gaussian_stats(features)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-6)
    assert frechet_distance(mu, sigma, mu + 2.0, sigma) == pytest.approx(8 * 4.0, rel=1e-6)


def test_frechet_distance_survives_singular_covariances():
    rng = np.random.default_rng(1)
    mu_a, sigma_a = gaussian_stats(rng.normal(size=(5, 16)))  # rank 4 < 16
    mu_b, sigma_b = gaussian_stats(rng.normal(size=(5, 16)))
    distance = frechet_distance(mu_a, sigma_a, mu_b, sigma_b)
    assert np.isfinite(distance) and distance > 0


def test_clip_score_is_raw_cosine():
    image = torch.tensor([[3.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    text = torch.tensor([[1.0, 0.0], [-5.0, -5.0], [1.0, 0.0]])
    torch.testing.assert_close(clip_score(image, text), torch.tensor([1.0, -1.0, 0.0]))


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """A randomly initialised Inception-v3 in the layout of the pytorch-fid / torch-fidelity weight files."""
    torch.manual_seed(0)
    model = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=True)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def test_inception_features_are_pool3_float64(inception_weights):
    torch.set_num_threads(1)
    path, state_dict = inception_weights
    extractor = load_inception(path, "cpu")
    torch.testing.assert_close(extractor.Mixed_7c.branch_pool.conv.weight, state_dict["Mixed_7c.branch_pool.conv.weight"])
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    features = inception_features(extractor, images)
    assert features.shape == (2, 2048) and features.dtype == np.float64
    assert np.isfinite(features).all() and not np.allclose(features[0], features[1])
    np.testing.assert_array_equal(features, inception_features(extractor, images))
    with pytest.raises(ValueError, match="uint8"):
        inception_features(extractor, images.float())


def test_inception_weights_with_wrong_names_are_rejected(tmp_path, inception_weights):
    _, state_dict = inception_weights
    renamed = {("renamed_" + name if name.startswith("fc.") else name): value for name, value in state_dict.items()}
    path = tmp_path / "bad.pth"
    torch.save(renamed, path)
    with pytest.raises(CheckpointError, match="fc.weight"):
        load_inception(path, "cpu")
