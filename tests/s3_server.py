"""A live, local S3 endpoint (moto in server mode) holding a directory tree, for tests and CI.

As a command line, it serves until killed (SIGTERM, SIGINT) and writes its endpoint URL to the
port file once the bucket is filled, so that a shell script can start it in the background:

    python tests/s3_server.py --root mirror --bucket mlcommons-training-wg-public \
        --prefix stable_diffusion/datasets --port-file s3.endpoint &
    S3_PID=$!; trap 'kill $S3_PID' EXIT
    while [ ! -s s3.endpoint ]; do sleep 0.2; done
    ENDPOINT=$(cat s3.endpoint)

In Python, `running_s3_server(root, bucket, prefix)` runs that command as a child process and
yields the endpoint; the child is stopped on every exit path of the `with` block (exceptions,
KeyboardInterrupt), and it also exits by itself if its parent dies. The process under test
therefore never imports moto: what it talks to is a real HTTP server.

moto accepts any credentials; TEST_KEY_ID / TEST_SECRET are what the uploads here use.
"""

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

TEST_KEY_ID = "testing-key-id"
TEST_SECRET = "testing-secret-do-not-log"
HOST = "127.0.0.1"


def free_port(host=HOST):
    """A TCP port nothing listens on right now (bound, then released)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _write_atomic(path, text):
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def upload_tree(endpoint, bucket, root, prefix=""):
    """Create `bucket` (if needed) and put every file under `root` at `<prefix>/<relative path>`."""
    import boto3  # noqa: PLC0415 - only the server process needs boto3

    client = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id=TEST_KEY_ID,
                          aws_secret_access_key=TEST_SECRET, region_name="us-east-1")
    existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
    if bucket not in existing:
        client.create_bucket(Bucket=bucket)
    keys = []
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        key = "/".join(x for x in (prefix.strip("/"), path.relative_to(root).as_posix()) if x)
        client.upload_file(str(path), bucket, key)
        keys.append(key)
    return keys


@contextlib.contextmanager
def serve(root=None, bucket="test-bucket", prefix="", host=HOST, port=0):
    """Run moto's ThreadedMotoServer in this process; yield its endpoint URL; always stop it.

    Used by the command line (a process of its own). Tests use running_s3_server instead.
    """
    from moto.server import ThreadedMotoServer  # noqa: PLC0415

    server = ThreadedMotoServer(ip_address=host, port=port, verbose=False)
    server.start()
    try:
        bound_host, bound_port = server.get_host_and_port()
        endpoint = f"http://{bound_host}:{bound_port}"
        if root is not None:
            upload_tree(endpoint, bucket, root, prefix)
        yield endpoint
    finally:
        server.stop()


@contextlib.contextmanager
def running_s3_server(root, bucket, prefix="", startup_timeout=60.0):
    """Start `python tests/s3_server.py` as a child; yield the endpoint; stop the child on exit."""
    root = Path(root)
    port_file = root.parent / f".s3-endpoint-{os.getpid()}-{time.monotonic_ns()}"
    log_file = port_file.with_suffix(".log")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--root", str(root), "--bucket", bucket,
           "--prefix", prefix, "--port-file", str(port_file), "--exit-with-parent"]
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + startup_timeout
        while not (port_file.exists() and port_file.read_text().strip()):
            if proc.poll() is not None:
                raise RuntimeError(f"s3 server exited with {proc.returncode}: {log_file.read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"s3 server not ready after {startup_timeout} s: {log_file.read_text()[-2000:]}")
            time.sleep(0.05)
        yield port_file.read_text().strip()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for path in (port_file, log_file):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _watch_parent(parent_pid, stop):
    while not stop.wait(0.5):
        if os.getppid() != parent_pid:  # re-parented: the parent is gone
            os.kill(os.getpid(), signal.SIGTERM)
            return


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", required=True, help="directory whose files are uploaded")
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", default="", help="key prefix of the uploaded tree")
    parser.add_argument("--host", default=HOST)
    parser.add_argument("--port", type=int, default=0, help="0: any free port")
    parser.add_argument("--port-file", required=True, help="gets the endpoint URL once the bucket is filled")
    parser.add_argument("--exit-with-parent", action="store_true", help="stop when the parent process dies")
    args = parser.parse_args(argv)

    def _stop(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    stop = threading.Event()
    if args.exit_with_parent:
        threading.Thread(target=_watch_parent, args=(os.getppid(), stop), daemon=True).start()
    port_file = Path(args.port_file)
    try:
        with serve(args.root, args.bucket, args.prefix, args.host, args.port) as endpoint:
            _write_atomic(port_file, endpoint + "\n")
            print(f"serving s3://{args.bucket}/{args.prefix} from {args.root} at {endpoint}", flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        stop.set()
        with contextlib.suppress(FileNotFoundError):
            port_file.unlink()


if __name__ == "__main__":
    main()
