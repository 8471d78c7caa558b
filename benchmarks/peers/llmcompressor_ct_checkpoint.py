"""Write compressed-tensors checkpoints of stories260K with llm-compressor itself (the real peer), for
``tests/test_compressed_tensors_load.py``: what ``qcompiler.load_compressed_tensors`` must read when the
writer is not qcompiler.

Runs INSIDE the llm-compressor virtual environment (``llmcompressor_setup.sh``: llmcompressor 0.14.0.1,
compressed-tensors 0.19.0, transformers 5.17.0); the model is loaded the way ``llmcompressor_oneshot.py``
loads it (``qcompiler.tools.models.load_model``, float32). Schemes, every ``nn.Linear`` but ``lm_head``:

  w4a16   GPTQModifier, int4 weights, group 64, symmetric, static (its defaults otherwise: actorder
          static, block 128, dampening 0.01); activations float. The down_proj layers (172 input
          columns, not a multiple of 64) stay float: llm-compressor refuses them ("Group and
          tensor-group quantization require columns % group_size == 0; compressed-tensors will error
          when saving or running forward") and its message says to ignore them
  w8a8    GPTQModifier with the ``W8A8`` preset: int8 weights per channel, symmetric; int8 activations
          dynamic per token (compressed-tensors' scale absmax / 127.5 at run time)
  w4a16-spinquant  SpinQuantModifier (rotations R1, R2 and R4, ``random-hadamard``: R1 / R2 fused into the
          weights, R4 an online transform on each down_proj's input, stored in the checkpoint's
          ``transform_config``), then w4a16's GPTQ

Calibration: ``--samples`` sequences of ``--seq`` tokens (BOS first) sampled with seed 0 by
``qcompiler.tools.data.calibration_batches`` from ``tinystories-calib`` (the paragraphs of
<shared>/data/text/tinystories/tinystories.txt that the stories260K evaluation does not read).

Writes ``<out>/stories260K-<scheme>/`` with ``save_pretrained(..., save_compressed=True)``, the tokenizer
and ``meta.json`` (versions, scheme, calibration hash, oneshot seconds); a folder that already holds
``meta.json`` is left as it is (delete it to rebuild). Each folder is written under a temporary name and
renamed when complete.

Usage (from the repository root):
    ~/.cache/qcompiler/venvs/llmcompressor/bin/python benchmarks/peers/llmcompressor_ct_checkpoint.py
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

SCHEMES = ("w4a16", "w8a8", "w4a16-spinquant")
MODEL = "stories260K"
DEFAULT_OUT = Path.home() / ".cache" / "qcompiler" / "peers" / "llmcompressor"

log = logging.getLogger("llmcompressor_ct_checkpoint")


def folder_for(out: Path, scheme: str) -> Path:
    """Where the checkpoint of ``scheme`` is written: ``<out>/stories260K-<scheme>``."""
    return out / f"{MODEL}-{scheme}"


def modifiers(scheme: str) -> list:
    """The llm-compressor modifiers that quantize with ``scheme`` (see the module docstring)."""
    if scheme == "w4a16-spinquant":
        from llmcompressor.modifiers.transform import SpinQuantModifier
        return [SpinQuantModifier(rotations=["R1", "R2", "R4"], transform_type="random-hadamard"),
                modifier("w4a16")]
    return [modifier(scheme)]


def modifier(scheme: str):
    """The llm-compressor modifier that quantizes with ``scheme`` (see the module docstring)."""
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationScheme, QuantizationStrategy,
                                                 QuantizationType)
    from llmcompressor.modifiers.gptq import GPTQModifier

    if scheme == "w4a16":
        weights = QuantizationArgs(num_bits=4, type=QuantizationType.INT, strategy=QuantizationStrategy.GROUP,
                                   group_size=64, symmetric=True, dynamic=False)
        return GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                            ignore=["lm_head", "re:.*down_proj$"])
    if scheme == "w8a8":
        return GPTQModifier(targets=["Linear"], scheme="W8A8", ignore=["lm_head"])
    raise ValueError(f"scheme must be one of {list(SCHEMES)}, got {scheme!r}")


def calibration(tokenizer, samples: int, seq: int) -> torch.Tensor:
    """int64 [samples, seq]: tinystories-calib sequences, BOS first, sampled with seed 0."""
    from qcompiler.tools import data, texts

    ids = data.tokenize_text(tokenizer, texts.text_path("tinystories-calib").read_text(encoding="utf-8"))
    return torch.cat(data.calibration_batches(ids, samples, seq, seed=0, bos_id=tokenizer.bos_token_id))


def loader(calib: torch.Tensor) -> torch.utils.data.DataLoader:
    """One [1, seq] sequence per batch, in order, all-ones attention mask."""
    batches = [{"input_ids": row.unsqueeze(0), "attention_mask": torch.ones_like(row).unsqueeze(0)} for row in calib]
    return torch.utils.data.DataLoader(batches, batch_size=1, shuffle=False, collate_fn=lambda b: b[0])


def write(scheme: str, out: Path, samples: int, seq: int) -> Path:
    """Quantize stories260K with ``scheme`` and save it compressed; returns the folder."""
    from llmcompressor import oneshot
    from qcompiler.tools import models

    target = folder_for(out, scheme)
    model, tokenizer = models.load_model(MODEL, dtype=torch.float32)
    calib = calibration(tokenizer, samples, seq)
    recipe = modifiers(scheme)
    t0 = time.perf_counter()
    model = oneshot(model=model, tokenizer=tokenizer, recipe=recipe, dataset=loader(calib),
                    num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1])
    oneshot_s = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=out))
    try:
        model.save_pretrained(str(tmp), save_compressed=True)
        tokenizer.save_pretrained(str(tmp))
        versions = {p: md.version(p) for p in ("llmcompressor", "compressed-tensors", "transformers", "torch")}
        meta = {"tool": "llm-compressor", "scheme": scheme, "model": MODEL, "modifier": repr(recipe),
                "versions": versions,
                "calibration_text": "tinystories-calib", "calibration_samples": int(calib.shape[0]),
                "seq_len": int(calib.shape[1]),
                "calibration_sha256": hashlib.sha256(calib.contiguous().numpy().tobytes()).hexdigest(),
                "oneshot_seconds": oneshot_s, "threads": torch.get_num_threads()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("%s: oneshot %.1f s, written to %s", scheme, oneshot_s, target)
    return target


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scheme", choices=SCHEMES, action="append", help="scheme to write (default: all)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"parent folder (default {DEFAULT_OUT})")
    ap.add_argument("--samples", type=int, default=16, help="calibration sequences (default 16)")
    ap.add_argument("--seq", type=int, default=256, help="calibration sequence length (default 256)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for scheme in args.scheme or SCHEMES:
        target = folder_for(args.out, scheme)
        if (target / "meta.json").is_file():
            log.info("%s: %s exists, skipped", scheme, target)
            continue
        write(scheme, args.out, args.samples, args.seq)
    return 0


if __name__ == "__main__":
    sys.exit(main())
