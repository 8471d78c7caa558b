"""Run llm-compressor's GPTQ or AWQ oneshot on SmolLM2-135M and save fake-quantized float weights.

Runs INSIDE the llm-compressor virtual environment (``llmcompressor_setup.sh``), driven by
``benchmarks/peers/llmcompressor.py`` from the project environment, which tokenizes and samples
the calibration set with the benchmark's protocol and hands it over as ``--calib`` (an int64
[samples, seq_len] tensor), so both tools calibrate on identical token ids.

Scheme: W4A16, int4 weights, group 64, symmetric (zero point 0, codes in [-8, 7]), on every
nn.Linear except ``lm_head``. GPTQ keeps llm-compressor's defaults otherwise (block 128,
dampening 0.01, static activation order); AWQ uses its default Llama mappings and duo scaling,
followed by a QuantizationModifier with the same scheme (its documented AWQ recipe).

Writes into ``--out``:
  weights.safetensors  float32 tensors by parameter name: every quantized linear weight
                       dequantized back to float (exactly what llm-compressor's own fake-quant
                       forward computes) plus every other parameter the oneshot changed
                       (AWQ folds its scales into norms and producing linears)
  qparams.safetensors  ``<linear>.weight_scale`` [N, K / 64] and ``<linear>.weight_zero_point``
  meta.json            tool and versions, scheme, calibration shape and hash, oneshot seconds,
                       ignored modules, grid check, and a hash of the FP32 weights as loaded

Usage (inside the venv):
    python llmcompressor_oneshot.py --method gptq --calib calib.safetensors --out DIR
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import logging
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

GROUP_SIZE = 64
NUM_BITS = 4
IGNORE = ["lm_head"]
METHODS = ("gptq", "awq")

log = logging.getLogger("llmcompressor_oneshot")


def weights_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over (name, dtype, shape, bytes) of every parameter, tied ones once, sorted by name."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        t = p.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def tensor_sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def load_smollm2():
    """SmolLM2-135M-Instruct from the cached GGUF file, exactly as ``qcompiler.tools.models.load_model``."""
    from qcompiler.tools import models

    return models.load_model("smollm2-135m", dtype=torch.float32)


def w4_group64_sym_scheme():
    """The explicit QuantizationScheme: int4 weights, group 64, symmetric, static; activations float."""
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationScheme, QuantizationStrategy,
                                                 QuantizationType)

    weights = QuantizationArgs(num_bits=NUM_BITS, type=QuantizationType.INT, strategy=QuantizationStrategy.GROUP,
                               group_size=GROUP_SIZE, symmetric=True, dynamic=False)
    return QuantizationScheme(targets=["Linear"], weights=weights)


def build_recipe(method: str) -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    config_groups = {"group_0": w4_group64_sym_scheme()}
    if method == "gptq":
        return [GPTQModifier(config_groups=config_groups, ignore=IGNORE)]
    if method == "awq":
        return [AWQModifier(), QuantizationModifier(config_groups=config_groups, ignore=IGNORE)]
    raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")


# llm-compressor 0.14.0.1's AWQ pins every cached batch before its grid search
# (IntermediatesCache.pin_memory, called unconditionally in AWQModifier._apply_smoothing); on a
# machine with no accelerator torch refuses: "RuntimeError: Cannot access accelerator device when
# none is available." Pinning only page-locks host memory for faster host-to-device copies and
# never changes a value, so without an accelerator it is made a no-op.
PIN_MEMORY_ERROR = "RuntimeError: Cannot access accelerator device when none is available."


def cpu_pin_memory_shim() -> list[str]:
    """Make ``IntermediatesCache.pin_memory`` a no-op when no accelerator exists; returns the patches applied."""
    if torch.accelerator.is_available():
        return []
    from llmcompressor.pipelines.cache import IntermediatesCache

    IntermediatesCache.pin_memory = lambda self, batch_index, input_names=None: None
    return ["llmcompressor.pipelines.cache.IntermediatesCache.pin_memory -> no-op (no accelerator; unpatched, "
            f"AWQ stops in AWQModifier._apply_smoothing with {PIN_MEMORY_ERROR!r})"]


def describe(modifier) -> str:
    """The algorithm settings of a modifier as it will run (defaults included), for the record."""
    keys = ("block_size", "dampening_frac", "actorder", "duo_scaling", "n_grid", "mappings", "ignore")
    fields = {k: getattr(modifier, k) for k in keys if hasattr(modifier, k)}
    return f"{type(modifier).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in fields.items()) + ")"


def calibration_loader(calib: torch.Tensor) -> torch.utils.data.DataLoader:
    """One [1, seq_len] sequence per batch, in the given order, no padding (all-ones attention mask)."""
    batches = [{"input_ids": row.unsqueeze(0), "attention_mask": torch.ones_like(row).unsqueeze(0)} for row in calib]
    return torch.utils.data.DataLoader(batches, batch_size=1, shuffle=False, collate_fn=lambda b: b[0])


def fake_quantized_linears(model: torch.nn.Module) -> dict[str, dict]:
    """For every linear llm-compressor quantized: its dequantized weight, scale, zero point, and a grid check."""
    from compressed_tensors.quantization import forward_quantize

    out = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if not isinstance(module, torch.nn.Linear) or scheme is None or scheme.weights is None:
            continue
        args = scheme.weights
        w = module.weight.detach().float()
        w_dq = forward_quantize(module, w, "weight", args).float()
        scale = module.weight_scale.detach().float()
        zero = getattr(module, "weight_zero_point", None)
        zero = zero.detach() if zero is not None else torch.zeros_like(scale, dtype=torch.int8)
        g_idx = getattr(module, "weight_g_idx", None)
        n, k = w.shape
        cols = g_idx.long() if g_idx is not None and g_idx.numel() else torch.arange(k) // args.group_size
        codes = w_dq / scale[:, cols] + zero[:, cols].float()
        grid_err = (codes - codes.round()).abs().max().item()
        out[name] = {"w_dq": w_dq, "scale": scale, "zero": zero, "codes_min": int(codes.round().min()),
                     "codes_max": int(codes.round().max()), "grid_err": grid_err}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--method", choices=METHODS, required=True)
    ap.add_argument("--calib", type=Path, required=True, help="safetensors with 'input_ids' int64 [samples, seq_len]")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--no-shim", action="store_true",
                    help="run llm-compressor unpatched (AWQ then fails on a machine without an accelerator)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    calib = load_file(str(args.calib))["input_ids"]
    if calib.dtype != torch.int64 or calib.ndim != 2:
        raise ValueError(f"--calib: input_ids must be int64 [samples, seq_len], got {calib.dtype} {tuple(calib.shape)}")

    from llmcompressor import oneshot

    model, tokenizer = load_smollm2()
    if calib.max().item() >= model.config.vocab_size or calib.min().item() < 0:
        raise ValueError(f"--calib: token ids outside [0, {model.config.vocab_size})")
    fp32_hash = weights_sha256(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    log.info("loaded SmolLM2 (%s), %d calibration sequences of %d tokens", type(model).__name__, *calib.shape)

    # oneshot re-reads the config from model.config.name_or_path and refuses checkpoints quantized
    # in another format. The GGUF loader dequantizes every tensor to float32 but leaves the marker
    # quantization_config={quant_method: gguf}; the model oneshot sees is the float model our
    # benchmark evaluates as FP32, so drop the marker and point it at a saved copy of the config
    # (a GGUF folder has no config.json).
    if getattr(model.config, "quantization_config", None) is not None:
        delattr(model.config, "quantization_config")
    config_dir = args.out / "config"
    model.config.save_pretrained(config_dir)
    model.config.name_or_path = str(config_dir)

    patches = [] if args.no_shim else cpu_pin_memory_shim()
    recipe = build_recipe(args.method)
    settings = [describe(m) for m in recipe]
    t0 = time.perf_counter()
    model = oneshot(model=model, tokenizer=tokenizer, recipe=recipe, dataset=calibration_loader(calib),
                    num_calibration_samples=calib.shape[0], max_seq_length=calib.shape[1])
    oneshot_s = time.perf_counter() - t0
    log.info("oneshot %s: %.1f s", args.method, oneshot_s)

    linears = fake_quantized_linears(model)
    if not linears:
        raise RuntimeError("oneshot left no quantized linear (no module carries a quantization_scheme)")
    tensors, qparams, changed = {}, {}, []
    for name, info in linears.items():
        tensors[f"{name}.weight"] = info["w_dq"].contiguous()
        qparams[f"{name}.weight_scale"] = info["scale"].contiguous()
        qparams[f"{name}.weight_zero_point"] = info["zero"].contiguous()
    for n, p in model.named_parameters():
        if n in before and n not in tensors and not torch.equal(p.detach(), before[n]):
            tensors[n] = p.detach().float().contiguous()
            changed.append(n)
    moved = [torch.count_nonzero(tensors[f"{n}.weight"] != before[f"{n}.weight"]).item() / before[f"{n}.weight"].numel()
             for n in linears]
    grid = {"linears": len(linears), "max_grid_err": max(i["grid_err"] for i in linears.values()),
            "codes_min": min(i["codes_min"] for i in linears.values()),
            "codes_max": max(i["codes_max"] for i in linears.values()),
            "min_fraction_changed": min(moved), "mean_fraction_changed": sum(moved) / len(moved)}
    qmin, qmax = -(1 << (NUM_BITS - 1)), (1 << (NUM_BITS - 1)) - 1
    if grid["max_grid_err"] > 1e-3 or grid["codes_min"] < qmin or grid["codes_max"] > qmax:
        raise RuntimeError(f"dequantized weights are not on a {NUM_BITS}-bit grid per group: {grid}")
    if grid["min_fraction_changed"] < 0.5:
        raise RuntimeError(f"quantization left most weights of some linear unchanged: {grid}")

    args.out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.out / "weights.safetensors"))
    save_file(qparams, str(args.out / "qparams.safetensors"))
    scheme = w4_group64_sym_scheme().weights
    meta = {
        "tool": "llm-compressor",
        "method": args.method,
        "version": md.version("llmcompressor"),
        "compressed_tensors_version": md.version("compressed-tensors"),
        "transformers_version": md.version("transformers"),
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
        "scheme": "W4A16",
        "num_bits": scheme.num_bits,
        "group_size": scheme.group_size,
        "symmetric": scheme.symmetric,
        "modifiers": settings,
        "calibration_samples": int(calib.shape[0]),
        "seq_len": int(calib.shape[1]),
        "calibration_sha256": tensor_sha256(calib),
        "oneshot_seconds": oneshot_s,
        "ignored": IGNORE,
        "patches": patches,
        "quantized_linears": sorted(linears),
        "other_changed_parameters": changed,
        "grid_check": grid,
        "fp32_weights_sha256": fp32_hash,
    }
    (args.out / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    log.info("wrote %s: %d linears, grid %s", args.out, len(linears), grid)
    return 0


if __name__ == "__main__":
    sys.exit(main())
