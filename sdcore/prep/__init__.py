"""Data preparation: LAION metadata to latent shards, COCO prompts and FID statistics, downloads.

Every writer here produces its output atomically (sdcore.files), so an interrupted job never
leaves a file that looks complete.
"""


class PrepError(RuntimeError):
    """Bad input or a failed preparation step; the message names the offending file."""


def resolve_device(device):
    """'auto' means the first CUDA device when there is one, else the CPU."""
    import torch  # kept local: the metadata steps do not need torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
