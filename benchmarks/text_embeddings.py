"""Benchmark (not a test): the training step with and without precomputed text embeddings (sdcore.embeddings).

Full-size models with random weights: the OpenCLIP ViT-H-14 text tower (penultimate layer, as SD2) and the
865.9 M-parameter UNet. Published-layout moment shards (64x64 latents) are written to a temporary directory,
their captions encoded once into the side store (sdcore.embeddings.encode_latent_index, timed: the one-off
cost per sample), then batches of the real stream (LatentShardSource, whose captions name their samples)
go through:

  * online: FrozenTextConditioner (the text encoder on the batch's captions) + UNet forward/backward;
  * precomputed: PrecomputedTextConditioner (lookup by sample key, CRC-checked) + UNet forward/backward;

alternating, best of --repeats. The optimizer step (AdamW, the same either way) is not timed. Each
conditioner's own time is printed too, so the saving can be scaled to another UNet cost.

    python benchmarks/text_embeddings.py [--batch 2] [--latent 64] [--repeats 2]
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
import time
from pathlib import Path

from machine import MachineInfo  # benchmarks/machine.py; also puts the repository on sys.path

import torch

from sdcore.data import FrozenTextConditioner, LatentShardSource, read_latent_index
from sdcore.embeddings import EncodeSettings, PrecomputedTextConditioner, encode_latent_index
from sdcore.files import write_json
from sdcore.prep.published import write_published_mirror
from sdcore.training.trainer import training_inputs
from sdcore.diffusion import LinearSchedule, v_loss
from unet_train_step import build_sdcore

ARCH = "ViT-H-14"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--samples", type=int, default=16, help="samples in the shards (all encoded once)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--no-unet", action="store_true", help="time the conditioners only")
    args = parser.parse_args()
    machine = MachineInfo.measure()
    machine.print()
    from sdcore.text_encoder import FrozenOpenCLIPText

    torch.manual_seed(0)
    encoder = FrozenOpenCLIPText(ARCH)
    online = FrozenTextConditioner(encoder)
    with tempfile.TemporaryDirectory(prefix="sdcore-embeddings-") as tmp:
        root = Path(tmp)
        mirror = write_published_mirror(root / "published", coco_prompts="image_id\tid\tcaption\n",
                                        coco_stats={"mu": [0.0], "sigma": [[1.0]]}, shards=2,
                                        samples_per_shard=args.samples // 2, latent_size=(args.latent, args.latent))
        index = root / "latents.json"
        write_json(index, {"shards": [str(p.relative_to(root)) for p in mirror.shards], "samples": args.samples})
        settings = EncodeSettings(precision="fp32", batch_size=args.batch, arch=ARCH)
        start = time.perf_counter()
        encode_latent_index(index, root / "embeddings" / "embeddings.json", encoder, settings, torch.device("cpu"))
        encode_seconds = time.perf_counter() - start
        store = sorted((root / "embeddings").glob("*.ctx.safetensors"))
        print(f"\nencoded {args.samples} captions once in {encode_seconds:.1f} s ({encode_seconds / args.samples:.2f} s "
              f"per sample); side store {sum(p.stat().st_size for p in store) / 2**20:.1f} MiB "
              f"({sum(p.stat().st_size for p in store) / args.samples / 2**10:.0f} KiB per sample)")
        lookup = PrecomputedTextConditioner(root / "embeddings" / "embeddings.json", precision="fp32",
                                            batch_size=args.batch)
        shards, samples = read_latent_index(index)
        source = LatentShardSource(shards, batch_size=args.batch, micro_batches_per_step=1, block_steps=10**6,
                                   shuffle_buffer=8, seed=0, rank=0, num_samples=samples)
        batches = list(itertools.islice(source.micro_batches(0), 2 * args.repeats + 1))
        cpu = torch.device("cpu")
        assert torch.equal(lookup(batches[0].captions, cpu), online(batches[0].captions, cpu))

        unet = None if args.no_unet else build_sdcore().train()
        schedule = LinearSchedule()
        best = {"online text encoder": [float("inf")] * 2, "precomputed lookup": [float("inf")] * 2}
        for repeat in range(args.repeats):
            for name, conditioner in (("online text encoder", online), ("precomputed lookup", lookup)):
                batch = batches[1 + repeat]
                z, t, noise = training_inputs(batch.moments, 0, repeat, 0, 0, 0.18215, 1000)
                start = time.perf_counter()
                context = conditioner(batch.captions, cpu)
                conditioned = time.perf_counter()
                if unet is not None:
                    unet.zero_grad(set_to_none=True)
                    loss = v_loss(unet(schedule.q_sample(z, t, noise), t, context), schedule.v_target(z, noise, t))
                    loss.backward()
                end = time.perf_counter()
                best[name] = [min(best[name][0], conditioned - start), min(best[name][1], end - start)]
                print(f"  repetition {repeat + 1}: {name:<22s} conditioner {conditioned - start:6.3f} s, "
                      f"step {end - start:7.2f} s", flush=True)
    print(f"\ntraining step (conditioner + UNet forward/backward; AdamW not timed), batch {args.batch}, latent "
          f"{args.latent}x{args.latent}, fp32, best of {args.repeats}:")
    print("| conditioning | conditioner s/step | step s | samples/s |")
    print("| --- | --- | --- | --- |")
    for name, (cond_s, step_s) in best.items():
        rate = args.batch / step_s if unet is not None else float("nan")
        print(f"| {name} | {cond_s:.3f} | {step_s:.2f} | {rate:.4f} |")
    if unet is not None:
        saved = best["online text encoder"][1] / best["precomputed lookup"][1]
        print(f"step speed-up with precomputed embeddings: {saved:.3f}x")


if __name__ == "__main__":
    main()
