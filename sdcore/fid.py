"""FID exactly as the MLPerf reference computes it (pytorch-fid v0.3 front end, published COCO statistics).

The reference (mlcommons/training ``retired_benchmarks/stable_diffusion``) scores with its copy of pytorch-fid
(``ldm/modules/fid``, pytorch-fid@0a754fb):

* generated images: float in [0, 1] -> ``F.interpolate(x, (299, 299), bilinear, align_corners=False)`` ->
  ``2 * x - 1`` -> pool3 (2048) of the TensorFlow-ported FID Inception, weights
  ``pt_inception-2015-12-05-6726825d.pth``;
* real side: ``val2014_30k_stats.npz`` (``mu``, ``sigma = np.cov(rowvar=False)``) made by pytorch-fid from the
  30,000 COCO images that ``scripts/datasets/coco-split-resize.py`` resized (PIL bicubic to 512x512, no mode
  conversion, saved under the original ``.jpg`` name: JPEG at PIL's default quality 75), read back with
  ``Image.open(path).convert('RGB')`` and ``ToTensor``.

The network is torch-fidelity's port of the same TF graph (its blocks carry the FID patches: average pools
without padded zeros, the max pool of the last block, BatchNorm eps 1e-3), assembled under pytorch-fid's
state-dict names, so the reference's weights file loads into it unchanged. torch-fidelity's own front end
(uint8 input, TF1-style resize, ``(x - 128) / 128``) is *not* used: it is a different front end and gives
different features.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy.linalg
from scipy.linalg.blas import dtrmm
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from sdcore.checkpoint import CheckpointError, load_state_dict_file
from sdcore.files import atomic_path

log = logging.getLogger(__name__)

FRONT_END = "pytorch-fid-v0.3"  # bilinear 299 (align_corners=False) on [0, 1] floats, then 2x - 1
FRONT_END_KEY = "front_end"  # extra npz key; the published stats have none and are FRONT_END's
INCEPTION_WEIGHTS_SHA1 = "bd836944fd6db519dfd8d924aa457f5b3c8357ff"  # pt_inception-2015-12-05-6726825d.pth
INCEPTION_SIZE = 299
FEATURE_DIM = 2048
COCO_SIZE = (512, 512)
FEATURE_BATCH = 50  # pytorch-fid's default, used by the reference to make the published statistics

# Module order of pytorch-fid's blocks 0-3 (its InceptionV3 with output block 3).
_LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "MaxPool_1", "Conv2d_3b_1x1", "Conv2d_4a_3x3",
           "MaxPool_2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d",
           "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "AvgPool")


class FidError(ValueError):
    """An unusable FID input (statistics file, images); the message names the file."""


class FidStats(NamedTuple):
    mu: np.ndarray  # (d,) float64
    sigma: np.ndarray  # (d, d) float64
    front_end: str


def file_sha1(path) -> str:
    """sha1 of a file (the reference checks the Inception weights with ``sha1sum -c``)."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class InceptionV3Features(nn.Module):
    """Pool3 features of the FID Inception behind the reference's front end.

    ``weights_path``: a pytorch-fid Inception state dict (``pt_inception-2015-12-05-6726825d.pth``), loaded with
    ``weights_only=True`` (None: random weights); ``sha1``: if given, the file must have it (``INCEPTION_WEIGHTS_SHA1`` for the real one).
    """

    def __init__(self, weights_path, device="cpu", sha1: str | None = None):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import (BasicConv2d, InceptionA, InceptionB, InceptionC,
                                                                  InceptionD, InceptionE_1, InceptionE_2)

        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.MaxPool_1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.MaxPool_2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE_1(1280)
        self.Mixed_7c = InceptionE_2(2048)
        self.AvgPool = nn.AdaptiveAvgPool2d(output_size=(1, 1))
        self.fc = nn.Linear(2048, 1008)  # unused; in the file, so the strict load checks the whole layout

        if weights_path is not None:  # None: random weights (the demo mirror makes its file so)
            self._load(weights_path, sha1)
        self.requires_grad_(False)
        self.eval()
        self.to(device)

    def _load(self, weights_path, sha1: str | None) -> None:
        if sha1 is not None and (actual := file_sha1(weights_path)) != sha1.lower():
            raise CheckpointError(f"{weights_path}: sha1 {actual} is not the expected {sha1}")
        state_dict = load_state_dict_file(weights_path)
        try:
            self.load_state_dict(state_dict, strict=True)
        except RuntimeError as error:  # missing / unexpected keys or shapes
            raise CheckpointError(f"{weights_path}: not a pytorch-fid Inception-v3 (FID variant, "
                                  f"pt_inception-2015-12-05) state dict: {error}") from error

    def train(self, mode: bool = True):
        """Always eval: BatchNorm must use the file's running statistics, even inside a module set to train."""
        return super().train(False)

    channels_last = False  # set by speed_up_

    @torch.no_grad()
    def speed_up_(self, fold_batchnorm: bool = True, channels_last: bool = True) -> "InceptionV3Features":
        """Speed path of the evaluation (``eval.fast_paths.fast_inception``), in place.

        ``fold_batchnorm``: each inference-mode BatchNorm folded into the convolution before it
        (``w * gamma / sqrt(var + eps)``, bias ``beta - mean * gamma / sqrt(var + eps)``): the same affine
        map, one pass over the activations fewer, rounded differently (features agree to ~1e-6
        relative; tests/test_eval_speed_paths.py). ``channels_last``: NHWC weights and activations,
        which oneDNN's forward convolutions run faster on a CPU. Measured on a 2-core AVX-512 Xeon:
        1.8x faster together (benchmarks/evaluation.py).
        """
        if fold_batchnorm:
            for block in self.modules():
                conv, bn = getattr(block, "conv", None), getattr(block, "bn", None)
                if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d):
                    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
                    conv.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
                    bias = bn.bias - bn.running_mean * scale
                    conv.bias = nn.Parameter(bias if conv.bias is None else bias + conv.bias * scale,
                                             requires_grad=False)
                    block.bn = nn.Identity()
        if channels_last:
            self.to(memory_format=torch.channels_last)
            self.channels_last = True
        return self

    @property
    def device(self) -> torch.device:
        return self.fc.weight.device

    @torch.no_grad()
    def forward(self, images: torch.Tensor, autocast: bool = False) -> torch.Tensor:
        """(B, 3, H, W) float images in [0, 1] -> (B, 2048) float32 pool3 features on the module's device.

        Any size: resized to 299 as the reference does (bilinear, align_corners=False, no antialias), then
        scaled to [-1, 1]. Computed in float32 (half inputs are upcast, an enclosing autocast is switched off),
        as pytorch-fid computed the published statistics; with ``autocast`` an enclosing autocast applies, as
        it did to the reference's generated images (Lightning fp16 validation).
        """
        if not torch.is_tensor(images) or not images.is_floating_point() or images.dim() != 4 \
                or images.shape[1] != 3:
            raise ValueError(f"expected float images (B, 3, H, W) in [0, 1], got "
                             f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}")
        x = images.to(self.device, torch.float32)
        if not bool(((x >= 0) & (x <= 1)).all()):  # also catches NaN; [-1, 1] images are a common mix-up
            raise ValueError(f"images must lie in [0, 1] (min {x.min().item():.4g}, max {x.max().item():.4g})")
        with contextlib.nullcontext() if autocast else torch.autocast(x.device.type, enabled=False):
            x = F.interpolate(x, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
            x = 2 * x - 1
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            for name in _LAYERS:
                x = getattr(self, name)(x)
        return x.flatten(1).float()


def resize_coco_image(src, dst, size=COCO_SIZE) -> None:
    """Resize one COCO image as ``coco-split-resize.py`` does; write ``dst`` atomically.

    ``Image.open(src).resize(size, BICUBIC)`` with no mode conversion (grayscale stays grayscale), saved with
    the format taken from ``dst``'s suffix and PIL's defaults: for the reference's ``.jpg`` names, JPEG quality 75.
    The temporary name keeps the suffix, so the format inference is the reference's.
    """
    try:
        with Image.open(src) as image:
            resized = image.resize(tuple(size), resample=Image.Resampling.BICUBIC)
    except (OSError, ValueError) as error:
        raise FidError(f"{src}: cannot read image: {error}") from error
    with atomic_path(dst) as tmp:
        resized.save(tmp)


def _read_image(path) -> torch.Tensor:
    from torchvision.transforms.functional import to_tensor

    try:
        with Image.open(path) as image:
            return to_tensor(image.convert("RGB"))
    except (OSError, ValueError) as error:
        raise FidError(f"{path}: cannot read image: {error}") from error


def image_file_features(paths, extractor: InceptionV3Features, batch_size: int = FEATURE_BATCH) -> np.ndarray:
    """(N, 2048) float64 features of image files, read as pytorch-fid's ``ImagePathDataset`` reads them.

    ``Image.open(path).convert('RGB')`` then ``ToTensor`` (float32 / 255), in batches of ``batch_size`` (the last
    one may be smaller, as pytorch-fid's ``drop_last=False``); images of one batch must share a size, as
    pytorch-fid's default collate requires.
    """
    paths = [Path(p) for p in paths]
    features = np.empty((len(paths), FEATURE_DIM))
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        images = [_read_image(p) for p in chunk]
        for path, image in zip(chunk, images):
            if image.shape != images[0].shape:
                raise FidError(f"{path}: size {tuple(image.shape[1:])} differs from {tuple(images[0].shape[1:])} "
                               f"of {chunk[0]} in the same batch")
        features[start:start + len(chunk)] = extractor(torch.stack(images)).double().cpu().numpy()
        log.debug("inception features: %d / %d", start + len(chunk), len(paths))
    return features


def gaussian_stats(features) -> tuple[np.ndarray, np.ndarray]:
    """float64 mean and ``np.cov(rowvar=False)`` of (N, d) features (numpy or torch), as pytorch-fid."""
    if torch.is_tensor(features):
        features = features.detach().cpu().double().numpy()
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"expected (N >= 2, d) features, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _check_stats(mu, sigma, source) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.asarray(mu), np.asarray(sigma)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise FidError(f"{source}: expected mu (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}")
    if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
        raise FidError(f"{source}: mu and sigma must be floating point, got {mu.dtype} and {sigma.dtype}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise FidError(f"{source}: mu or sigma holds non-finite values")
    return mu.astype(np.float64), sigma.astype(np.float64)


def save_stats(path, mu, sigma, front_end: str = FRONT_END) -> None:
    """Write ``mu``, ``sigma`` (the reference's keys, ``savez_compressed`` as its writer) and ``front_end``."""
    mu, sigma = _check_stats(mu, sigma, path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, mu=mu, sigma=sigma, **{FRONT_END_KEY: np.array(front_end)})


def load_stats(path, front_end: str | None = None) -> FidStats:
    """Read FID statistics; a file without ``front_end`` (the published one) is the reference's FRONT_END.

    If ``front_end`` is given, the file's must equal it. Errors name the file.
    """
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise FidError(f"{path}: a single array, not an .npz archive with mu and sigma")
        with data:
            missing = [k for k in ("mu", "sigma") if k not in data.files]
            if missing:
                raise FidError(f"{path}: missing key(s) {missing} (has {data.files}); not FID statistics")
            mu, sigma = data["mu"], data["sigma"]
            stored = data[FRONT_END_KEY] if FRONT_END_KEY in data.files else np.array(FRONT_END)
    except FidError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
        # missing, not an npz, truncated, or holding pickled objects
        raise FidError(f"{path}: cannot read FID statistics (.npz with mu, sigma): {error}") from error
    if stored.ndim != 0 or stored.dtype.kind != "U":
        raise FidError(f"{path}: {FRONT_END_KEY!r} must be a string, got {stored.dtype} {stored.shape}")
    stored = str(stored)
    if front_end is not None and stored != front_end:
        raise FidError(f"{path}: statistics made with front end {stored!r}, expected {front_end!r}")
    mu, sigma = _check_stats(mu, sigma, path)
    return FidStats(mu, sigma, stored)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr sqrt(S1 S2) for symmetric PSD S1, S2, from the eigenvalues of a symmetric matrix.

    For any F with F F^T = S1, S1 S2 = F (F^T S2) has the eigenvalues of F^T S2 F (eig(AB) = eig(BA)), which is
    symmetric PSD: Tr sqrt(S1 S2) = sum sqrt(eig(F^T S2 F)). F is a Cholesky factor of S1 or, if S1 is not
    positive definite, of S2 (roles swap); if neither is (fewer samples than dimensions on both sides),
    F = V sqrt(max(w, 0)) from S1's eigendecomposition. Rounding-negative eigenvalues count as 0, as the real
    part of scipy's complex sqrtm does.
    """
    for a, b in ((sigma1, sigma2), (sigma2, sigma1)):
        try:
            lower = scipy.linalg.cholesky(a, lower=True, check_finite=False)
        except np.linalg.LinAlgError:
            continue
        # L^T (b L) with two triangular multiplies: half the flops of two general products.
        product = dtrmm(1.0, lower, dtrmm(1.0, lower, b, side=1, lower=1), side=0, lower=1, trans_a=1)
        break
    else:
        w, v = scipy.linalg.eigh(sigma1, check_finite=False)
        factor = v * np.sqrt(np.clip(w, 0, None))
        product = factor.T @ sigma2 @ factor
    # eigh reads the lower triangle only: the product's rounding asymmetry does not matter.
    eigenvalues = scipy.linalg.eigh(product, lower=True, eigvals_only=True, check_finite=False)
    return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2, offset: float = 0.0) -> float:
    """||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr sqrt(S1 S2): pytorch-fid's ``calculate_frechet_distance``.

    Same value (to rounding), without scipy's ``sqrtm`` of the non-symmetric product (tens of seconds at
    2048-d): see ``_trace_sqrt_product`` (about 1-2 s). Equal covariances give exactly ||mu1 - mu2||^2.

    Singular covariances (fewer samples than dimensions): the value is the exact one, the limit of
    Tr sqrt((S1 + eI)(S2 + eI)) as e -> 0. pytorch-fid returns the same when scipy's sqrtm of the singular
    product is finite (scipy >= 1.16 usually is, up to sqrtm's own error); when it is not, it retries with
    e = 1e-6 added to both covariances inside the root only, which *lowers* the FID by about
    2 sum sqrt(1e-6 * lambda) over the null directions. ``offset=1e-6`` reproduces that fallback exactly.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, dtype=np.float64)), np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"Gaussian shapes differ: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}")
    if not all(np.isfinite(a).all() for a in (mu1, mu2, sigma1, sigma2)):
        raise ValueError("FID: mu or sigma holds non-finite values")
    diff = mu1 - mu2
    mean_term = float(diff @ diff)
    if offset == 0 and np.array_equal(sigma1, sigma2):
        return mean_term  # Tr(2S - 2 sqrt(S^2)) = 0 exactly
    s1, s2 = (sigma1 + sigma1.T) / 2, (sigma2 + sigma2.T) / 2
    if offset:
        s1, s2 = s1 + offset * np.eye(len(s1)), s2 + offset * np.eye(len(s2))
    return mean_term + float(np.trace(sigma1) + np.trace(sigma2)) - 2.0 * _trace_sqrt_product(s1, s2)
