"""Encode image shards into VAE moment shards (<key>.npy, (8, s/8, s/8) float32)."""

import argparse

import yaml

from sdcore.prep.latents import encode_manifest
from sdcore.logs import setup_logging


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--manifest", required=True, help="image manifest from fetch_images.py")
    parser.add_argument("--out-dir", required=True)
    parser.add_argument("--out-manifest", required=True, help="latent manifest JSON, written last")
    parser.add_argument("--checkpoint", required=True, help="SD checkpoint holding first_stage_model.*")
    parser.add_argument("--config", required=True,
                        help="(merged) workflow config YAML; model.params.first_stage_config.params is used")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--workers", type=int, default=1, help="image decoding threads")
    parser.add_argument("--antialias", action="store_true",
                        help="antialiased bicubic resize (the reference's torchvision did not antialias tensors)")
    args = parser.parse_args()
    setup_logging()
    with open(args.config) as f:
        first_stage = yaml.safe_load(f)["model"]["params"]["first_stage_config"]["params"]
    encode_manifest(args.manifest, args.out_dir, args.out_manifest, args.checkpoint, first_stage,
                    image_size=args.image_size, batch_size=args.batch_size, device=args.device,
                    antialias=args.antialias, workers=args.workers)


if __name__ == "__main__":
    main()
