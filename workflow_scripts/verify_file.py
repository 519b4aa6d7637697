"""Check a file's size and digests against the expected ones and record what was found (JSON).

Without an expected digest the computed ones are recorded, so they can be pinned in the config.
"""

import argparse
import os
import sys

from sdcore.files import write_json
from sdcore.prep.download import file_digests


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--file", required=True)
    parser.add_argument("--sha256", help="expected sha256 (hex)")
    parser.add_argument("--sha512", help="expected sha512 (hex)")
    parser.add_argument("--size", type=int, help="expected size in bytes")
    parser.add_argument("--out", required=True, help="JSON record of the verification")
    args = parser.parse_args()
    size = os.path.getsize(args.file)
    expected = {name: getattr(args, name).lower() for name in ("sha256", "sha512") if getattr(args, name)}
    digests = file_digests(args.file, sorted(set(expected) | {"sha256"}))
    problems = [f"{name} {digests[name]} != expected {value}" for name, value in expected.items()
                if digests[name] != value]
    if args.size is not None and size != args.size:
        problems.append(f"size {size} != expected {args.size}")
    if problems:
        sys.exit(f"{args.file}: does not match the config: {'; '.join(problems)}; delete it to download it again")
    write_json(args.out, {"file": args.file, "size": size, **digests, "checked_against": sorted(expected)})
    print(f"{args.file}: {size} bytes, sha256 {digests['sha256']}" + (" (verified)" if expected else " (recorded)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
