"""A table of what the rebuild chain made of each LAION part: rows in and kept by the licence filter,
images stored and failed by img2dataset (with the commonest error kinds), moments encoded and skipped."""

import argparse
import collections
import os

from sdcore.files import read_json, write_text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--filter-summary", required=True)
    parser.add_argument("--images", nargs="+", required=True, help="images/<part>/manifest.json, in part order")
    parser.add_argument("--latents", nargs="+", required=True, help="latents/<part>/manifest.json, same order")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    filtered = read_json(args.filter_summary)
    rows = [f"{'part':<60} {'rows':>8} {'kept':>8} {'stored':>8} {'failed':>8} {'encoded':>8} {'skipped':>8}"]
    totals, errors = collections.Counter(), collections.Counter()
    for images_path, latents_path in zip(args.images, args.latents):
        part = os.path.basename(os.path.dirname(images_path))
        images, latents = read_json(images_path), read_json(latents_path)
        counts = filtered["per_part"][f"{part}.parquet"]
        values = {"rows": counts["rows_in"], "kept": counts["rows_kept"], "stored": images["samples"],
                  "failed": images["failed"], "encoded": latents["samples"], "skipped": latents["failed"]}
        totals.update(values)
        errors.update(images["errors"])
        rows.append(f"{part:<60} " + " ".join(f"{values[k]:>8}" for k in values))
    rows.append(f"{'all parts':<60} " + " ".join(f"{totals[k]:>8}" for k in ("rows", "kept", "stored", "failed",
                                                                                "encoded", "skipped")))
    rows.append(f"licence filter mode(s): {', '.join(filtered['modes'])}")
    rows += ["commonest fetch errors:"] + [f"  {count:>8}  {kind}" for kind, count in errors.most_common(5)]
    write_text(args.out, "\n".join(rows) + "\n")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
