"""The end of a run, for people: a text summary (throughput, loss, FID/CLIP per checkpoint against
the targets, the time to train from the MLPerf log, the checker's verdict) and a plot of FID and
CLIP per checkpoint with the target lines."""

from __future__ import annotations

import json
from pathlib import Path

from sdcore.files import atomic_path, read_json
from sdcore.mlperf_log import MLLOG_PREFIX


def mlperf_times(log_path: Path) -> dict:
    """run_start/run_stop times (ms), the run_stop status and its samples, from an MLPerf log."""
    found = {}
    for line in log_path.read_text().splitlines():
        if line.startswith(MLLOG_PREFIX):
            record = json.loads(line[len(MLLOG_PREFIX):])
            if record["key"] in ("run_start", "run_stop"):
                found[record["key"]] = record
    start, stop = found.get("run_start"), found.get("run_stop")
    if start is None or stop is None:
        return {}
    return {"time_to_train_seconds": (stop["time_ms"] - start["time_ms"]) / 1000.0,
            "status": stop["metadata"].get("status"), "samples_count": stop["metadata"].get("samples_count")}


def evaluation_rows(run_dir: Path) -> list[dict]:
    """The evaluated checkpoints of a run (eval/step_N.json), in step order; skipped ones left out."""
    rows = [read_json(path) for path in sorted((run_dir / "eval").glob("step_*.json"))]
    return [row for row in rows if "fid" in row]


def run_report(run_dir) -> str:
    run_dir = Path(run_dir)
    summary = read_json(run_dir / "train" / "summary.json")
    evaluations = evaluation_rows(run_dir)
    lines = [
        f"run {run_dir}: training {summary['status']} after {summary['samples_seen']} samples ({summary['steps']} steps, "
        f"global batch {summary['global_batch_size']}, {summary['world_size']} ranks, {summary['precision']}, "
        f"seed {summary['seed']})",
        f"throughput: {summary['samples_per_second']:.2f} samples/s over {summary['train_seconds']:.1f} s of training"
        + (f"; resumed {summary['attempts'] - 1} time(s) after an interruption, {summary['downtime_seconds']:.0f} s "
           "of downtime counted in the MLPerf time to train (the rules time one continuous run)"
           if summary["attempts"] > 1 else ""),
        f"loss: final {summary['final_loss']:.4f}; curve {run_dir / 'train' / 'loss.png'}",
    ]
    if evaluations:
        first = evaluations[0]
        lines.append(f"checkpoints (target FID <= {first['fid_target']:g} and CLIP >= {first['clip_target']:g}):")
        lines.append(f"  {'step':>8} {'samples':>10} {'FID':>10} {'CLIP':>8}  target")
        lines += [f"  {e['step']:>8} {e['samples_seen']:>10} {e['fid']:>10.3f} {e['clip']:>8.4f}  "
                  f"{'met' if e['targets_met'] else 'not met'}" for e in evaluations]
    mlperf_log = run_dir / "mlperf.log"
    if mlperf_log.exists():
        times = mlperf_times(mlperf_log)
        lines.append(f"MLPerf log: {mlperf_log}" + (
            f" (run_stop {times['status']} at {times['samples_count']} samples, time to train "
            f"{times['time_to_train_seconds']:.1f} s)" if times else ""))
    check = run_dir / "mlperf_check.txt"
    if check.exists():
        lines += [line.strip() for line in check.read_text().splitlines() if line.startswith("verdict")]
    return "\n".join(lines) + "\n"


def plot_evaluations(run_dir, png_path) -> None:
    """FID and CLIP per checkpoint against training samples, with the target lines (atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = evaluation_rows(Path(run_dir))
    fig, (ax_fid, ax_clip) = plt.subplots(1, 2, figsize=(10, 4))
    samples = [r["samples_seen"] for r in rows]
    for ax, key, label in ((ax_fid, "fid", "FID (lower is better)"), (ax_clip, "clip", "CLIP score (higher is better)")):
        ax.plot(samples, [r[key] for r in rows], "o-", label=key.upper())
        if rows:
            ax.axhline(rows[0][f"{key}_target"], color="tab:red", ls="--", label=f"target {rows[0][f'{key}_target']:g}")
        ax.set_xlabel("training samples")
        ax.set_title(label)
        ax.grid(alpha=0.3)
        ax.legend()
    if rows and max(r["fid"] for r in rows) > 10 * rows[0]["fid_target"]:
        ax_fid.set_yscale("log")
    fig.suptitle(f"evaluations of {run_dir}")
    fig.tight_layout()
    with atomic_path(png_path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)
