"""Write a run's final MLPerf log.

offline (eval.mode offline): the training log merged with the evaluation results of its checkpoints
(sdcore.mlperf_log.merge_run_log); results of checkpoints the training never reached (an early stop)
are left out. inline: the trainer logged its evaluations and run_stop itself; the log is checked for
its run_stop and copied.
"""

import argparse
import shutil
import sys

from sdcore.files import atomic_path, read_json
from sdcore.mlperf_log import MergeError, merge_run_log, read_mllog


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["offline", "inline"], required=True)
    parser.add_argument("--train-log", required=True, help="the training job's mlperf.log")
    parser.add_argument("--evaluations", nargs="*", default=[], help="eval/step_N.json results (offline)")
    parser.add_argument("--fid-target", type=float, required=True)
    parser.add_argument("--clip-target", type=float, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    try:
        if args.mode == "inline":
            if not any(line.record and line.record["key"] == "run_stop" for line in read_mllog(args.train_log)):
                raise MergeError(f"{args.train_log}: no run_stop (the training has not finished)")
            with atomic_path(args.out) as tmp:
                shutil.copyfile(args.train_log, tmp)
            print(f"{args.out}: copied from {args.train_log}")
            return 0
        scored = [path for path in args.evaluations if "fid" in read_json(path)]
        result = merge_run_log(args.train_log, scored, args.out, args.fid_target, args.clip_target)
    except MergeError as error:
        sys.exit(f"mlperf_log: {error}")
    print(f"{args.out}: {result.status}; evaluated at {result.evaluated} samples; time to train "
          f"{result.run_minutes:.2f} min" + (f"; first passing checkpoint at {result.passing_samples} samples"
                                              if result.passing_samples is not None else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
