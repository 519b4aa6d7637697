"""Train (or resume) the benchmark's UNet in a run directory; see sdcore.training.

Start one process per rank with workflow_scripts/launch.py (srun inside a SLURM allocation,
torchrun elsewhere). Exit status 0: finished (target reached or sample budget); 75: preempted
(SIGTERM/SIGUSR1) after saving the state, so a retry of the same command resumes; 2: a run that this
command must not continue, or more bad training samples than train.max_bad_samples (one line naming
the run directory or the shards; the state is saved, so the run resumes once that is mended).
"""

import argparse
import sys
from pathlib import Path

import yaml

from sdcore.evaluate import EvalInputs
from sdcore.logs import setup_logging
from sdcore.distributed import LaunchShapeError
from sdcore.data import BadSampleError, ShardReadError
from sdcore.training.trainer import BadDataError, RunError, TrainInputs, main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="the run's training config (YAML)")
    parser.add_argument("--run-dir", required=True, type=Path, help="results/<run>: state, checkpoints, logs")
    parser.add_argument("--latents", required=True, type=Path, help="latent index JSON of the training set")
    parser.add_argument("--sd-checkpoint", required=True, type=Path, help="SD checkpoint (frozen text encoder, VAE)")
    parser.add_argument("--text-embeddings", type=Path,
                        help="precomputed text embeddings index (train.text_embeddings: precomputed)")
    inline = parser.add_argument_group("inline evaluation (eval.mode: inline)")
    inline.add_argument("--prompts", type=Path, help="COCO prompt TSV")
    inline.add_argument("--fid-stats", type=Path, help="COCO Inception statistics (.npz)")
    inline.add_argument("--inception", type=Path, help="Inception weights (pytorch-fid layout)")
    inline.add_argument("--clip", type=Path, help="OpenCLIP weights of the CLIP score")
    return parser.parse_args()


def run() -> int:
    args = parse_args()
    config = yaml.safe_load(args.config.read_text())
    eval_inputs = None
    if config["eval"]["mode"] == "inline":
        missing = [flag for flag in ("prompts", "fid_stats", "inception", "clip") if getattr(args, flag) is None]
        if missing:
            sys.exit(f"eval.mode is inline: pass {', '.join('--' + m.replace('_', '-') for m in missing)}")
        eval_inputs = EvalInputs(prompts=args.prompts, fid_stats=args.fid_stats, inception=args.inception,
                                 clip=args.clip, sd_checkpoint=args.sd_checkpoint)
    setup_logging()
    try:
        return main(config, args.run_dir, TrainInputs(latents=args.latents, sd_checkpoint=args.sd_checkpoint,
                                                      eval=eval_inputs, text_embeddings=args.text_embeddings))
    except (RunError, LaunchShapeError, BadDataError, BadSampleError, ShardReadError) as error:
        print(f"train: {error}", file=sys.stderr)  # one line per rank (naming the file), not a traceback
        return 2


if __name__ == "__main__":
    sys.exit(run())
