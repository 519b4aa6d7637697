"""Evaluation metrics: FID (Inception-v3 pool3 Gaussians, Fréchet distance) and the raw CLIP score.

The Fréchet distance follows the reference (pytorch-fid's formula, scipy's matrix square root, an eps offset
when the covariance product is singular). Inception features come from torch-fidelity's TensorFlow-compatible
Inception-v3, fed with weights that we load ourselves with ``weights_only=True``.
"""

import io
import logging

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from sdcore.checkpoint import CheckpointError, load_state_dict_file

log = logging.getLogger(__name__)

INCEPTION_FEATURE = "2048"  # pool3
SQRTM_EPS = 1e-6
IMAGINARY_TOLERANCE = 1e-3


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (rows are samples) in float64, as saved in FID statistics files."""
    features = np.asarray(features, dtype=np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrt(S1 S2)) between two Gaussians."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    sigma1, sigma2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"Gaussian shapes differ: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        log.warning("FID: singular covariance product; adding %g to the diagonals", SQRTM_EPS)
        offset = np.eye(sigma1.shape[0]) * SQRTM_EPS
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        largest_imaginary = np.max(np.abs(np.diagonal(covmean).imag))
        if largest_imaginary > IMAGINARY_TOLERANCE:
            raise ValueError(f"FID: matrix square root has an imaginary component of {largest_imaginary}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Per-pair cosine similarity of normalised features: raw, not scaled by 100 nor clipped at 0."""
    return (F.normalize(image_features.float(), dim=-1) * F.normalize(text_features.float(), dim=-1)).sum(dim=-1)


def load_inception(weights_path, device="cpu"):
    """torch-fidelity's ``inception-v3-compat`` extractor (pool3 features) with weights from ``weights_path``.

    torch-fidelity unpickles a weights path with ``weights_only=False``. To keep untrusted pickles out of it,
    the file is loaded here with ``weights_only=True`` and only those plain tensors, re-serialised in memory,
    are handed on.
    """
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    state_dict = load_state_dict_file(weights_path)
    safe_copy = io.BytesIO()
    torch.save(state_dict, safe_copy)
    safe_copy.seek(0)
    try:
        extractor = FeatureExtractorInceptionV3("inception-v3-compat", [INCEPTION_FEATURE],
                                                feature_extractor_weights_path=safe_copy)
    except RuntimeError as error:  # load_state_dict's strict key/shape check
        raise CheckpointError(f"{weights_path}: not an Inception-v3 (torch-fidelity layout) state dict: {error}") from error
    return extractor.to(device)


@torch.no_grad()
def inception_features(extractor, images_uint8: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) uint8 images -> (B, 2048) float64 pool3 activations (the extractor resizes to 299)."""
    if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4 or images_uint8.shape[1] != 3:
        raise ValueError(f"expected uint8 images (B, 3, H, W), got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    device = next(extractor.parameters()).device
    (features,) = extractor(images_uint8.to(device))
    return features.double().cpu().numpy()
