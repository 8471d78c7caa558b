"""``export_onnx``: a quantized model as an ONNX Q/DQ graph for TensorRT's explicit quantization.

Steps: plan and quantize a copy of the model with the usual passes (``qcompiler.quantize``);
fold SmoothQuant scales back into norms; put every quantized linear in Q/DQ form
(``qdq_form``); ``torch.onnx.export(dynamo=True)`` with translations of the Q/DQ ops
(``onnx_ops``); rewrite weight placeholders into typed initializers (``finalize``); check
TensorRT's rules (``tensorrt_rules``) and ``onnx.checker`` (full check); write the file.

What is written, per quantized linear: ``x -> QuantizeLinear -> DequantizeLinear -> MatMul``
(static per-tensor scale, zero-point 0, one pair per GEMM) with the weight an initializer behind a
DequantizeLinear: INT8 / FP8 ``[K, N]`` per-channel on axis 1 straight into the MatMul, INT4
``[N, K]`` blocked along axis 1 then ``Transpose``; then ``Add`` of the bias. Float layers
(fallback, output head, norms, attention) stay float32. Batch and sequence axes are dynamic.

Online Hadamard transforms (a rotation with ``online=True``) become two float MatMuls with constant
matrices in front of the linear's activation Q/DQ (``online_rotation.DenseHadamard``).

With ``recipe.kv_cache`` (static per-tensor INT8 / FP8 keys and values; other KV formats are
refused, ``kv_qdq.check_kv_exportable``): each attention computes
``softmax((q * scaling) @ DQ(Q(K^T)) + mask) @ DQ(Q(V))``, one static per-tensor scale for its keys
and one for its values (initializers ``<attention path>.kv_key_scale`` / ``.kv_value_scale``) from
the recipe's calibration, as the KV-cache pass quantizes the cache in the compiled graph
(``kv_qdq``). The export checks that the written graph holds those 2 pairs per attention.
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
import time
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import torch
from onnx import TensorProto

from qcompiler import api
from qcompiler.core.kv_format import KV_STATS_ATTR
from qcompiler.core.online_rotation import to_dense_hooks
from qcompiler.runtime.eager import QuantizedLinear
from qcompiler.errors import RecipeError, UnsupportedError
from qcompiler.pipeline import CompileReport
from qcompiler.recipes import Granularity, QuantDtype, Recipe, resolve

from .finalize import finalize
from .kv_qdq import KEY_SCALE, KV_NOTE, VALUE_SCALE, check_kv_exportable, install_kv_qdq
from .onnx_ops import translation_table
from .qdq_form import fold_norm_smoothing, to_qdq_form
from .tensorrt_rules import QDQSummary, check_tensorrt

__all__ = ["OnnxExport", "export_onnx", "required_opset", "check_exportable", "runtime_notes", "MIN_EXPORT_OPSET"]

log = logging.getLogger(__name__)

#: The lowest opset ``torch.onnx.export(dynamo=True)`` writes natively (lower ones go through a
#: version converter that fails on these graphs); TensorRT reads INT8 Q/DQ from opset 13.
MIN_EXPORT_OPSET = 18
_DEFAULT_OPSET = 19          # the first opset with FP8 and with onnx.reference's DequantizeLinear
_EXTERNAL_DATA_BYTES = 1_800_000_000   # protobuf's 2 GB limit, with room


@dataclass(frozen=True)
class OnnxExport:
    """What ``export_onnx`` wrote."""

    path: Path
    opset: int
    recipe: str
    inputs: tuple[str, ...]
    summary: QDQSummary
    report: CompileReport = field(repr=False)
    file_bytes: int = 0
    quantized_weight_bytes: int = 0       # bytes of the quantized weight initializers (scales excluded)
    quantized_weight_count: int = 0       # how many weights they hold
    smoothing_folded: tuple[str, ...] = ()
    smoothing_explicit: dict[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()           # how runtimes compute the graph (``runtime_notes``)
    kv_cache: tuple[str, ...] = ()        # attentions whose keys / values got Q/DQ (recipe.kv_cache), in call order

    @property
    def bytes_per_quantized_weight(self) -> float:
        return self.quantized_weight_bytes / max(1, self.quantized_weight_count)

    def describe(self) -> str:
        gemms = ", ".join(f"{k}: {v}" for k, v in sorted(self.summary.gemms.items()))
        lines = [f"wrote {self.path} ({self.file_bytes / 1e6:.1f} MB, opset {self.opset}, recipe {self.recipe!r}, "
                 f"inputs {', '.join(self.inputs)})",
                 f"  GEMMs by weight/activation type: {gemms}",
                 f"  quantized weights: {self.quantized_weight_count:,} values in {self.quantized_weight_bytes / 1e6:.1f} MB "
                 f"({self.bytes_per_quantized_weight:.3f} bytes per weight; "
                 f"{4 * self.quantized_weight_count / 1e6:.1f} MB as float32)"]
        if self.kv_cache:
            lines.append(f"  KV cache: keys and values Q/DQ in {len(self.kv_cache)} attention(s)")
        if self.smoothing_folded:
            lines.append(f"  SmoothQuant / AWQ scales folded into {len(self.smoothing_folded)} norm(s)")
        for norm, why in self.smoothing_explicit.items():
            lines.append(f"  SmoothQuant / AWQ scale of {norm} kept as an explicit Mul: {why}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _keeps_every_linear(recipe: Recipe) -> bool:
    """A KV-cache-only recipe: its fallback keeps every linear in float, so its weight spec is never used."""
    return recipe.kv_cache is not None and "linear" in recipe.fallback.keep_op_kinds


def required_opset(recipe: Recipe) -> int:
    """The lowest opset whose Q/DQ can carry ``recipe``: 13 (INT8), 19 (FP8), 21 (INT4)."""
    dtypes = set() if _keeps_every_linear(recipe) else {recipe.weight.dtype}
    dtypes |= {recipe.activation.dtype} if recipe.activation is not None else set()
    dtypes |= {recipe.kv_cache.dtype} if recipe.kv_cache is not None else set()
    return 21 if QuantDtype.INT4 in dtypes else 19 if QuantDtype.FP8_E4M3 in dtypes else 13


def runtime_notes(recipe: Recipe) -> tuple[str, ...]:
    """What to expect from onnxruntime's CPU int8 GEMM for ``recipe``'s INT8 GEMMs (none for other
    formats): exact with 7-bit weights on every x86 CPU; with full-range weights only with VNNI or
    AMX, plus this machine's verdict (``runtime.check_int8_gemm``) when onnxruntime is installed."""
    kv = (KV_NOTE,) if recipe.kv_cache is not None else ()
    if recipe.weight.dtype is not QuantDtype.INT8 or recipe.activation is None or _keeps_every_linear(recipe):
        return kv
    if recipe.weight.reduce_range:
        return ("INT8 weights are 7-bit ([-64, 63], weight.reduce_range): onnxruntime's CPU int8 GEMM computes them "
                "exactly on every x86 CPU, with or without VNNI (a u8 x s8 product pair stays within int16); for "
                "TensorRT this is an ordinary INT8 graph",) + kv
    note = ("onnxruntime's CPU int8 GEMM computes full-range INT8 weights exactly with VNNI (AVX512-VNNI, "
            "AVX-VNNI) or AMX; on AVX2 CPUs without VNNI it sums u8 x s8 product pairs in int16 and saturates, so "
            "its results differ from TensorRT's and the reference's. Weights with weight.reduce_range=True (7-bit, "
            "`export-onnx --reduce-range`) are exact there too. TensorRT is not affected")
    try:
        from .runtime import check_int8_gemm
        return (note, f"this machine: {check_int8_gemm().describe()}") + kv
    except ImportError:          # onnxruntime is not installed
        return (note,) + kv


def check_exportable(recipe: Recipe) -> None:
    """Refuse recipes TensorRT's explicit quantization cannot express, before any work."""
    act, w = recipe.activation, recipe.weight
    check_kv_exportable(recipe)
    if recipe.embedding is not None:
        raise UnsupportedError(f"recipe {recipe.name!r} quantizes the embedding tables (recipe.embedding); the "
                               "TensorRT Q/DQ export writes quantized linears only: export with embedding=None")
    if act is not None and act.dynamic:
        raise UnsupportedError(f"recipe {recipe.name!r} has dynamic per-token activations; TensorRT Q/DQ takes static "
                               "per-tensor scales (rule 'activation-per-tensor'): use a per_tensor activation recipe "
                               "such as 'w8a8-int8-sq' or 'fp8'")
    if _keeps_every_linear(recipe) and act is None:
        return                   # KV cache only: every linear stays float, the weight spec is unused
    if not w.symmetric:
        raise UnsupportedError(f"recipe {recipe.name!r} has asymmetric weights; TensorRT needs zero-points 0 "
                               "(rule 'zero-point'): use weight.symmetric=True")
    if act is None and w.dtype is not QuantDtype.INT4:
        raise UnsupportedError(f"recipe {recipe.name!r} is {w.dtype.value} weight-only; TensorRT's weight-only "
                               "quantization is INT4 only (rule 'gemm-activation'): quantize activations too, or "
                               "use INT4 weights")
    if w.granularity is Granularity.PER_GROUP and w.dtype is not QuantDtype.INT4:
        raise UnsupportedError(f"recipe {recipe.name!r} has per-group {w.dtype.value} weights; TensorRT blocks INT4 "
                               "weights only (rule 'weight-block')")
    if w.dtype is QuantDtype.INT4 and act is not None and act.dtype is QuantDtype.INT8:
        raise UnsupportedError(f"recipe {recipe.name!r} has INT4 weights with INT8 activations; TensorRT's INT4 GEMMs "
                               "read float (weight-only) or FP8 activations (rule 'gemm-activation'): use 'w4a8-awq' "
                               "(FP8 activations) or a W4A16 preset")


def _choose_opset(recipe: Recipe, opset: int | None) -> int:
    need = required_opset(recipe)
    if opset is None:
        return max(_DEFAULT_OPSET, need)
    if not isinstance(opset, int) or isinstance(opset, bool):
        raise RecipeError(f"opset={opset!r} must be an integer")
    if opset < max(need, MIN_EXPORT_OPSET):
        raise UnsupportedError(f"opset {opset} is too low: recipe {recipe.name!r} needs opset >= {need} (rule 'opset') "
                               f"and the exporter writes opset >= {MIN_EXPORT_OPSET}")
    if opset > onnx.defs.onnx_opset_version():
        raise UnsupportedError(f"opset {opset} is newer than this onnx ({onnx.defs.onnx_opset_version()})")
    return opset


def _as_inputs(example_inputs) -> dict[str, torch.Tensor]:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = {"input_ids": example_inputs if example_inputs.dim() >= 2 else example_inputs.unsqueeze(0)}
    if not isinstance(example_inputs, Mapping) or not example_inputs:
        raise ValueError("example_inputs must be a token-id tensor [batch, seq] or a dict of named tensors, "
                         f"got {type(example_inputs).__name__}")
    for k, v in example_inputs.items():
        if not isinstance(v, torch.Tensor) or v.dim() < 2 or v.shape[1] < 2:
            shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"example_inputs[{k!r}] must be a tensor [batch, seq, ...] with seq >= 2, got {shape}")
    return dict(example_inputs)


class _Outputs(torch.nn.Module):
    """Calls the model with named inputs (and ``use_cache=False`` where it takes it); returns logits."""

    def __init__(self, model: torch.nn.Module, names: tuple[str, ...]):
        super().__init__()
        self.model, self.names = model, names
        params = inspect.signature(model.forward).parameters
        self.extra = {"use_cache": False} if "use_cache" in params else {}

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, inputs)), **self.extra)
        if hasattr(out, "logits"):
            return out.logits
        return out[0] if isinstance(out, (tuple, list)) else out


_WIDE_FLOATS = (torch.float16, torch.bfloat16, torch.float64)


def _float32(model: torch.nn.Module) -> torch.nn.Module:
    """The export runs in float32 (scales and the float layers of the graph are float32); FP8
    weights of an already quantized model stay FP8."""
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            if t.dtype in _WIDE_FLOATS:
                t.data = t.data.float()
    return model


def _torch_export(module: _Outputs, inputs: dict[str, torch.Tensor], opset: int, dynamic: bool) -> onnx.ModelProto:
    args, shapes = tuple(inputs.values()), None
    if dynamic:
        # trace with batch >= 2: torch.export specializes a dimension of size 1
        args = tuple(v.repeat(2, *([1] * (v.dim() - 1))) if v.shape[0] == 1 else v for v in args)
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
        shapes = (tuple({0: batch, 1: seq} for _ in args),)      # for forward(*inputs)
    with warnings.catch_warnings():
        # inputs sharing the batch / seq dims (input_ids, attention_mask) make the exporter say so
        warnings.filterwarnings("ignore", message=".*shares the same shape constraints with another axis")
        program = torch.onnx.export(module, args, dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                                    input_names=list(inputs), output_names=["logits"],
                                    custom_translation_table=translation_table(opset), verbose=False)
    return program.model_proto


def _weight_storage(model: onnx.ModelProto) -> tuple[int, int]:
    """(bytes stored, values) of the initializers read by weight DequantizeLinear nodes."""
    inits = {t.name: t for t in model.graph.initializer}
    seen, nbytes, count = set(), 0, 0
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits and node.input[0] not in seen:
            t = inits[node.input[0]]
            seen.add(t.name)
            n = math.prod(t.dims)
            count += n
            if t.raw_data:
                nbytes += len(t.raw_data)
            else:   # typed fields: count the packed size
                nbytes += (n + 1) // 2 if t.data_type in (TensorProto.INT4, TensorProto.UINT4) else n
    return nbytes, count


def _save(model: onnx.ModelProto, path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    large = model.ByteSize() > _EXTERNAL_DATA_BYTES
    if large:
        onnx.save_model(model, str(path), save_as_external_data=True, location=path.name + ".data")
        onnx.checker.check_model(str(path), full_check=True)
        return path.stat().st_size + (path.parent / (path.name + ".data")).stat().st_size
    onnx.save_model(model, str(path))
    return path.stat().st_size


def export_onnx(model: torch.nn.Module, recipe: Recipe | str, example_inputs, path: str | Path,
                calibration: Iterable | None = None, *, opset: int | None = None, dynamic: bool = True,
                progress: bool = True) -> OnnxExport:
    """Quantize a copy of ``model`` with ``recipe`` and write it as an ONNX Q/DQ graph for TensorRT.

    Args:
        model: a float model (a Hugging Face causal LM, or any module whose forward takes the
            named ``example_inputs``), or one already quantized by ``qcompiler.quantize`` with
            ``recipe`` (then no planning or calibration runs); it is not modified.
        recipe: a ``Recipe`` or preset name with static per-tensor activations (INT8, FP8) or
            INT4 weights (weight-only or FP8 activations); dynamic recipes are refused. A
            ``kv_cache`` with static per-tensor INT8 / FP8 keys and values (``kv-fp8``, alone or
            composed: ``fp8+kv-fp8``) adds their Q/DQ in every attention (a transformers model);
            other KV formats are refused, saying why.
        example_inputs: token ids [batch, seq] or a dict of named inputs (e.g. ``input_ids`` and
            ``attention_mask``); the ONNX graph takes the same names, batch and seq dynamic.
        path: the ``.onnx`` file to write.
        calibration: batches for static activation scales, SmoothQuant and sensitivity fallback.
        opset: ONNX opset (default: 19, or 21 for INT4; at least 18).
        dynamic: dynamic batch and sequence axes.
        progress: show a progress bar while calibrating.

    Raises:
        UnsupportedError: the recipe cannot be expressed for TensorRT (dynamic activations,
            asymmetric weights, non-INT4 weight-only, INT4 weights with INT8 activations, too low an
            opset; a kv_cache that is INT4, per_token, per_head / per_channel, asymmetric or keeps a
            residual window), or its
            kv_cache cannot be placed in this model's attention.
        CalibrationError: the recipe has a kv_cache and neither calibration nor a model carrying
            its KV calibration was given.
        TensorRTLegalityError: the graph broke a rule of ``tensorrt_rules.RULES`` (names the node).
    """
    from qcompiler.runtime.fused_experts import refuse_experts
    recipe = resolve(recipe)
    check_exportable(recipe)
    refuse_experts(model, "export_onnx")
    opset = _choose_opset(recipe, opset)
    inputs = _as_inputs(example_inputs)
    path = Path(path)
    t0 = time.perf_counter()
    qmodel = _float32(copy.deepcopy(model).eval())
    if any(isinstance(m, QuantizedLinear) for m in qmodel.modules()) or KV_STATS_ATTR in qmodel.__dict__:
        report = api.report(qmodel)
        if report.recipe != recipe.name:
            raise RecipeError(f"the model was quantized with recipe {report.recipe!r}, not {recipe.name!r}")
    else:
        api.quantize(qmodel, recipe, calibration, example_input=inputs, progress=progress)
        report = api.report(qmodel)
    folds = fold_norm_smoothing(qmodel, report)
    n_qdq = to_qdq_form(qmodel)
    # online Hadamard transforms (rotation online=True): two float MatMuls with constant matrices each
    n_online = to_dense_hooks(qmodel)
    if n_online:
        log.info("export_onnx: %d online Hadamard transforms written as MatMuls", n_online)
    if n_qdq == 0 and recipe.kv_cache is None:
        log.warning("export_onnx: no linear was quantized; the graph is float")
    log.info("export_onnx: planned in %.1f s, %d quantized linears", time.perf_counter() - t0, n_qdq)
    outputs = _Outputs(qmodel, tuple(inputs)).eval()
    kv_paths: list[str] = []
    if recipe.kv_cache is not None:
        kv_paths = install_kv_qdq(qmodel, recipe, qmodel.__dict__.get(KV_STATS_ATTR),
                                  lambda: outputs(*inputs.values()))
    onnx_model = _torch_export(outputs, inputs, opset, dynamic)
    finalize(onnx_model)
    if kv_paths:
        _check_kv_qdq(onnx_model, kv_paths)
        for p in kv_paths:       # eager quantize leaves the KV cache to qcompiler.kv_cache; the graph holds it
            d = report.tensors.get(p)
            if d is not None and d.kind == "kv_cache":
                d.quantize, d.reason = True, ""
                d.note = (f"ONNX: static per-tensor Q/DQ on K^T and V in front of the attention's batched matmuls "
                          f"(model.{p}.{KEY_SCALE} / {VALUE_SCALE})")
    summary = check_tensorrt(onnx_model)
    if onnx_model.ByteSize() <= _EXTERNAL_DATA_BYTES:
        onnx.checker.check_model(onnx_model, full_check=True)
    file_bytes = _save(onnx_model, path)
    qbytes, qcount = _weight_storage(onnx_model)
    log.info("export_onnx: wrote %s (%.1f MB) in %.1f s", path, file_bytes / 1e6, time.perf_counter() - t0)
    return OnnxExport(path, opset, recipe.name, tuple(inputs), summary, report, file_bytes, qbytes, qcount,
                      folds.folded, dict(folds.explicit), runtime_notes(recipe), tuple(kv_paths))


def _check_kv_qdq(model: onnx.ModelProto, paths: list[str]) -> None:
    """Every attention's keys and values reach the graph through a QuantizeLinear with its scale: the
    KV quantization is never dropped silently."""
    quantized: dict[str, int] = {}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) > 1:
            quantized[node.input[1]] = quantized.get(node.input[1], 0) + 1
    lacking = []
    for path in paths:
        for attr in (KEY_SCALE, VALUE_SCALE):
            if not any(name.endswith(f"{path}.{attr}") and n > 0 for name, n in quantized.items()):
                lacking.append(f"{path}.{attr}")
    if lacking:
        raise RuntimeError(f"export_onnx: recipe.kv_cache: the exported graph lacks the key / value QuantizeLinear of "
                           f"{lacking[:4]} ({len(lacking)} of {2 * len(paths)})")
