"""Download one file (any fsspec URL, s3:// included, or a local path) with retries, resume and verification.

S3 (s3://bucket/key, any S3-compatible service): --s3-endpoint names the service (default: the
AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL environment variables, else AWS itself). Credentials:
the access key id and the secret are each taken from its flag when given, else from
AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN); when neither is set,
botocore's default chain applies (AWS_PROFILE, ~/.aws/credentials, instance roles); --s3-anon
sends unsigned requests. Prefer the environment for the secret: command lines are visible to
other users and Snakemake logs its shell commands. The secret is never logged.

Exit status 0 on success; 1 with one error line naming what failed otherwise.
"""

import argparse
import logging
import os
import sys

from sdcore.logs import setup_logging
from sdcore.prep import PrepError
from sdcore.prep.download import PROGRESS_SECONDS, download, resolve_s3_credentials, s3_storage_options

log = logging.getLogger("download")


def _s3_options(args):
    key, secret, token, source = resolve_s3_credentials(args.s3_access_key_id, args.s3_secret_access_key)
    endpoint = args.s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if args.s3_anon:
        key = secret = token = None
        source = "none (anonymous)"
    shown = f" (access key id {key[:4]}...)" if key else ""
    log.info("s3: endpoint %s, credentials from %s%s", endpoint or "AWS default", source, shown)
    return s3_storage_options(endpoint, key, secret, token, anon=args.s3_anon, region=args.s3_region)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="fsspec URL (https://, file://, s3://, ...) or local path")
    parser.add_argument("--out", required=True, help="destination file (written atomically)")
    parser.add_argument("--sha256", help="expected sha256 (hex)")
    parser.add_argument("--md5", help="expected md5 (hex)")
    sha512 = parser.add_mutually_exclusive_group()
    sha512.add_argument("--sha512", help="expected sha512 (hex)")
    sha512.add_argument("--sha512-from", metavar="SUMS", help="a sha512sums.txt listing the expected sha512")
    parser.add_argument("--sha512-name", help="name to look up in --sha512-from (default: last part of --url)")
    parser.add_argument("--size", type=int, help="expected size in bytes")
    parser.add_argument("--retries", type=int, default=3, help="retries after the first attempt")
    parser.add_argument("--backoff-seconds", type=float, default=2.0,
                        help="wait before the first retry; doubles with each further one")
    parser.add_argument("--progress-seconds", type=float, default=PROGRESS_SECONDS,
                        help="at most one progress line per this many seconds (0: every chunk; negative: none)")
    s3 = parser.add_argument_group("S3 (s3:// URLs only)")
    s3.add_argument("--s3-endpoint", help="endpoint URL of the S3-compatible service")
    s3.add_argument("--s3-access-key-id", help="access key id (default: AWS_ACCESS_KEY_ID)")
    s3.add_argument("--s3-secret-access-key",
                    help="secret access key (default: AWS_SECRET_ACCESS_KEY; prefer the environment)")
    s3.add_argument("--s3-region", help="region name (R2 accepts auto; default: botocore's)")
    s3.add_argument("--s3-anon", action="store_true", help="unsigned requests (public buckets)")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    setup_logging()
    try:
        sha512 = args.sha512
        if args.sha512_from:
            from sdcore.prep.published import expected_sha512

            sha512 = expected_sha512(args.sha512_from, args.sha512_name or args.url.rstrip("/").rsplit("/", 1)[-1])
        storage_options = None
        if args.url.startswith(("s3://", "s3a://")):
            storage_options = _s3_options(args)
        elif args.s3_endpoint or args.s3_access_key_id or args.s3_secret_access_key or args.s3_anon:
            log.warning("%s: not an s3:// URL; the --s3-* flags are ignored", args.url)
        download(args.url, args.out, sha256=args.sha256 or None, md5=args.md5 or None, sha512=sha512 or None,
                 size=args.size, retries=args.retries, backoff_seconds=args.backoff_seconds,
                 storage_options=storage_options,
                 progress_seconds=None if args.progress_seconds < 0 else args.progress_seconds)
    except PrepError as err:
        log.error("%s", err)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
