"""Atomic file writes: every output of the project appears complete or not at all.

A writer gets a temporary path in the destination's directory (same suffix, so writers that
infer the format from the name still work); when it returns, the file is flushed to disk and
renamed over the destination, and the directory entry is synced. If it fails, or the process
is killed, only a hidden ``.<name>.<pid>.tmp<suffix>`` remains, which no reader takes for the
output (the trainer removes those of its run directory when it starts again). A full disk or any
other write error names the destination: an ``OSError`` "cannot write <path>: <reason>", also when
the writer is a library that reports the system error in its own exception type (safetensors'
``SafetensorError: ... No space left on device (os error 28)``) or raises another error while
handling it (torch.save's zip writer); other errors of a writer get a note naming the destination.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import json
import os
import re
from pathlib import Path

import torch


UMASK = os.umask(0o022)
os.umask(UMASK)


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")


def is_temporary(name: str) -> bool:
    """True for the hidden names atomic_path writes to (to skip them when listing outputs)."""
    return name.startswith(".") and ".tmp" in name


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside ``path``; on success sync it and rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~UMASK)  # some writers (safetensors) create private files
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent, directory=True)
    except OSError as error:
        raise OSError(error.errno, f"cannot write {path}: {error.strerror or error}") from error
    except Exception as error:
        code = _system_error(error)
        if code is not None:
            raise OSError(code, f"cannot write {path}: {os.strerror(code)} ({type(error).__name__}: {error})") \
                from error
        error.add_note(f"(while writing {path})")
        raise
    finally:
        if tmp.exists():
            tmp.unlink()


_OS_ERROR = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")


def _system_error(error: BaseException) -> int | None:
    """The errno behind a library's own exception: one it reports in its message (Rust's "(os error
    28)", Python's "[Errno 28]"), or an OSError it was raised while handling (torch.save's zip writer
    on a full disk raises "unexpected pos" while closing, with the ENOSPC as its context)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in errno_codes.errorcode:
            return error.errno
        match = _OS_ERROR.search(str(error))
        code = int(match.group(1) or match.group(2)) if match else None
        if code in errno_codes.errorcode:
            return code
        error = error.__cause__ or error.__context__
    return None


def write_text(path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path, obj) -> None:
    """Indented JSON with sorted keys, atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path, default=FileNotFoundError):
    """The JSON in ``path``; ``default`` when the file does not exist (if given). A malformed file
    raises ValueError naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        if default is FileNotFoundError:
            raise
        return default
    except ValueError as error:
        raise ValueError(f"{path}: not valid JSON: {error}") from error


def save_torch(obj, path) -> None:
    """``torch.save`` atomically (loadable with ``torch.load(weights_only=True)`` when ``obj`` is)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
