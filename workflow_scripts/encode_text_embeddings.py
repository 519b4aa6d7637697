"""Encode every caption of the training shards once with the frozen text encoder (sdcore.embeddings):
one <shard>.ctx.safetensors per shard of the latent index beside --out, then the index --out."""

import argparse

import yaml

from sdcore.embeddings import encode_for_config
from sdcore.logs import setup_logging


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--latents", required=True, help="latent index JSON (index_latents.py)")
    parser.add_argument("--sd-checkpoint", required=True, help="SD checkpoint holding cond_stage_model.*")
    parser.add_argument("--config", required=True, help="(merged) run config YAML: model.params.cond_stage_config, "
                                                        "train.precision and train.batch_size are used")
    parser.add_argument("--out", required=True, help="embeddings index JSON, written last")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (the training device's type)")
    parser.add_argument("--shards", type=int, nargs="+", help="only these shard positions, no index (parallel jobs)")
    args = parser.parse_args()
    setup_logging()
    with open(args.config) as f:
        config = yaml.safe_load(f)
    encode_for_config(config, args.latents, args.sd_checkpoint, args.out, device=args.device, shards=args.shards)


if __name__ == "__main__":
    main()
