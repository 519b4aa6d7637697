"""Benchmark (not a test): sdcore.fid.frechet_distance vs pytorch-fid's scipy-sqrtm one on 2048-d statistics.

Prints the machine (benchmarks/machine.py: CPU model, capability, AMX, matmul peaks), and the seconds of each on Inception-like
statistics (positive means, power-law spectrum; full rank, as with 30,000 images) and, for sdcore, on singular
ones (fewer samples than dimensions, as in small demos). Goal: sdcore under 2 s on the full-rank case.
pytorch-fid is the `test` extra; without it the sqrtm side is the same formula written here.

    OMP_NUM_THREADS=1 python benchmarks/frechet.py [--samples 3000] [--repeats 3] [--no-sqrtm]
"""

import argparse
import statistics
import time
import warnings

import numpy as np

from machine import MachineInfo  # benchmarks/machine.py; also puts the repository on sys.path

from sdcore.fid import frechet_distance, gaussian_stats

GOAL_SECONDS = 2.0


def inception_like(rng, dims, samples, basis, spectrum, mean):
    return mean + (rng.standard_normal((samples, dims)) * np.sqrt(spectrum)) @ basis.T


def statistics_pair(dims, samples, seed=0):
    rng = np.random.default_rng(seed)
    basis_a, _ = np.linalg.qr(rng.standard_normal((dims, dims)))
    basis_b, _ = np.linalg.qr(basis_a + 0.05 * rng.standard_normal((dims, dims)))
    spectrum_a = 2.0 * np.arange(1, dims + 1) ** -0.9
    spectrum_b = spectrum_a * rng.uniform(0.7, 1.4, dims)
    mean_a = rng.uniform(0.2, 0.6, dims)
    mean_b = mean_a + rng.normal(0, 0.08, dims)
    a = inception_like(rng, dims, samples, basis_a, spectrum_a, mean_a)
    b = inception_like(rng, dims, samples, basis_b, spectrum_b, mean_b)
    return gaussian_stats(a) + gaussian_stats(b)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    value = fn(*args, **kwargs)
    return float(value), time.perf_counter() - start


def scipy_sqrtm_frechet(mu1, sigma1, mu2, sigma2):
    """pytorch-fid's calculate_frechet_distance (scipy sqrtm of the product), for when it is not installed."""
    import scipy.linalg

    covmean, _ = scipy.linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    diff = mu1 - mu2
    return diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean.real)


def sqrtm_reference():
    try:
        from pytorch_fid.fid_score import calculate_frechet_distance

        return "pytorch-fid calculate_frechet_distance (scipy sqrtm)", calculate_frechet_distance
    except ImportError:
        return "scipy sqrtm formula of pytorch-fid (pytorch-fid not installed)", scipy_sqrtm_frechet


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, default=2048)
    parser.add_argument("--samples", type=int, default=3000, help="samples per side of the full-rank case")
    parser.add_argument("--singular-samples", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-sqrtm", action="store_true", help="skip the slow scipy sqrtm side")
    args = parser.parse_args()

    MachineInfo.measure().print()
    print(f"numpy {np.__version__}")

    stats = statistics_pair(args.dims, args.samples)
    runs = [timed(frechet_distance, *stats) for _ in range(args.repeats)]
    value, seconds = runs[0][0], [s for _, s in runs]
    best, median = min(seconds), statistics.median(seconds)
    verdict = "meets" if median < GOAL_SECONDS else "MISSES"
    print(f"\nfull rank, d={args.dims}, {args.samples} samples per side")
    print(f"  sdcore.fid.frechet_distance: FID {value:.9g}  median {median:.2f} s, best {best:.2f} s "
          f"of {args.repeats}  (goal < {GOAL_SECONDS:.0f} s: {verdict})")
    if not args.no_sqrtm:
        label, reference = sqrtm_reference()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # scipy's `disp` deprecation in pytorch-fid
            ref_value, ref_seconds = timed(reference, *stats)
        print(f"  {label}: FID {ref_value:.9g}  {ref_seconds:.2f} s  "
              f"(speed-up x{ref_seconds / median:.1f}, relative difference {abs(value - ref_value) / ref_value:.1e})")

    singular = statistics_pair(args.dims, args.singular_samples, seed=1)
    value, seconds = timed(frechet_distance, *singular)
    print(f"\nsingular, d={args.dims}, {args.singular_samples} samples per side (eigendecomposition path)")
    print(f"  sdcore.fid.frechet_distance: FID {value:.9g}  {seconds:.2f} s")


if __name__ == "__main__":
    main()
