"""Atomic outputs: write into a temporary sibling, then rename. An interrupted write leaves no destination."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def check_destination(dest: str | os.PathLike, overwrite: bool, flag: str = "overwrite=True") -> None:
    """Raise ``FileExistsError`` (naming the fix) if ``dest`` is a file, or a non-empty directory without
    ``overwrite``. ``flag`` names the switch that allows overwriting (e.g. ``--force`` for the CLI)."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is not a directory. Fix: choose another output directory.")
    if dest.exists() and any(dest.iterdir()) and not overwrite:
        raise FileExistsError(f"{dest} already exists and is not empty. Fix: choose another output directory or "
                              f"pass {flag}.")


@contextlib.contextmanager
def atomic_directory(dest: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary directory beside ``dest``; on normal exit rename it to ``dest``.

    The temporary directory lives in ``dest``'s parent (same filesystem, so the final ``os.rename`` is atomic) and
    is removed on any exception. With ``overwrite=True`` an existing ``dest`` is moved aside first and removed only
    after the new one is in place.

    Modes of what lands follow the process umask (as a plain ``mkdir``/``open`` would).

    Raises:
        FileExistsError: ``dest`` is a file, or a non-empty directory and ``overwrite`` is False.
    """
    dest = Path(dest)
    check_destination(dest, overwrite)
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    except OSError as exc:
        raise OSError(f"cannot create {dest} ({exc}). Fix: choose a writable location with free space.") from exc
    try:
        yield tmp
        _apply_umask(tmp)
        old = None
        if dest.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
            os.rmdir(old)
            os.rename(dest, old)
        os.rename(tmp, dest)
        _fsync_dir(dest.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json_atomic(path: str | os.PathLike, data) -> Path:
    """Write ``data`` as indented JSON to ``path`` atomically (temporary file + ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _apply_umask(root: Path) -> None:
    """``mkdtemp``/``mkstemp`` create owner-only entries; give the output the modes a plain write would get."""
    mask = _umask()
    os.chmod(root, 0o777 & ~mask)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            os.chmod(os.path.join(dirpath, d), 0o777 & ~mask)
        for f in filenames:
            os.chmod(os.path.join(dirpath, f), 0o666 & ~mask)


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
