"""Prune a model's decoder linears to N:M semi-structured sparsity in float (``sparsify``).

``sparsify`` runs layer-by-layer calibration (``qcompiler.calibration.layerwise``: each decoder block
sees the outputs of the blocks already pruned before it, its linears found as the quantizing passes find
them, routers and the output head left dense) with SparseGPT or magnitude pruning in place of a
quantizer, then writes the pruned float weights into the model. Fused mixture-of-experts weights (transformers 5's
3-D experts) are pruned expert by expert: SparseGPT from each expert's routed tokens (an expert no token reaches:
by magnitude), magnitude pruning from the weights. To prune and quantize in one sweep use a
recipe whose weight algorithm is a ``SparseGPTSpec`` (the ``sparse24-*`` presets) with ``qcompiler.quantize``
instead: quantizing a model pruned here with another weight algorithm (GPTQ, AWQ) refills the zeros.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from qcompiler.algorithms.sparsegpt import check_prunable, is_semi_structured, magnitude_prune, prune_linear
from qcompiler.calibration.expert_inputs import LAYOUT_ATTR, float_reason, fused_expert_weights
from qcompiler.core.linear_probe import linear_orientation
from qcompiler.errors import CalibrationError
from qcompiler.recipes import FallbackSpec, Recipe, SparseGPTSpec, WeightSpec

__all__ = ["PrunedWeight", "SparsityReport", "sparsify"]


@dataclass
class PrunedWeight:
    """A pruned float weight [N, K] in layer-by-layer calibration's results (it has no quantized form)."""

    weight: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    def dequantize(self, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.weight.to(out_dtype)

    def to(self, device) -> "PrunedWeight":
        return PrunedWeight(self.weight.to(device))


@dataclass
class SparsityReport:
    """What ``sparsify`` did: ``pruned`` {module path: note}, ``zeros`` the fraction of the pruned linears'
    weights that are 0, ``seconds`` the wall time."""

    spec: SparseGPTSpec
    pruned: dict[str, str] = field(default_factory=dict)
    zeros: float = 0.0
    seconds: float = 0.0

    def describe(self) -> str:
        lines = [f"{self.spec.method} {self.spec.pattern}: {len(self.pruned)} linears pruned, "
                 f"{self.zeros:.1%} of their weights zero ({self.seconds:.1f} s)"]
        lines += [f"  {fqn}: {note}" for fqn, note in self.pruned.items()]
        return "\n".join(lines)


def sparsify(model: torch.nn.Module, calibration: Iterable, spec: SparseGPTSpec | None = None, *,
             keep_modules: tuple[str, ...] = (), progress: bool = True, seed: int = 0) -> SparsityReport:
    """Prune ``model``'s decoder-block linears in place to ``spec``'s N:M pattern, in float.

    Args:
        model: a causal LM (its repeated decoder blocks are found from the module tree).
        calibration: batches as ``qcompiler.quantize`` takes them (token ids or dicts of model inputs).
            SparseGPT takes its Hessians from them; magnitude pruning only runs the blocks once to find
            their linears (and routers, which stay dense).
        spec: ``SparseGPTSpec()`` (SparseGPT 2:4) by default; ``SparseGPTSpec(method="magnitude")`` is
            the plain baseline.
        keep_modules: ``fnmatch`` globs of module paths left dense.
        progress: a progress bar over the blocks.
        seed: which calibration rows are sampled for statistics.

    Raises:
        CalibrationError: no calibration batches; UnsupportedError: a linear whose input channels are not a
        multiple of ``spec.m`` (name it in ``keep_modules``).
    """
    from qcompiler.calibration.layerwise import LayerwiseCalibration

    spec = SparseGPTSpec() if spec is None else spec
    if not isinstance(spec, SparseGPTSpec):
        raise TypeError(f"sparsify: spec must be a SparseGPTSpec, got {type(spec).__name__}")
    if calibration is None:
        raise CalibrationError("sparsify needs calibration batches: they find the decoder blocks' linears and give "
                               "SparseGPT its Hessians")
    start = time.perf_counter()
    recipe = Recipe(name=f"sparse-{spec.method}-{spec.n}:{spec.m}", weight=WeightSpec(), weight_algorithm=spec,
                    layerwise=True, fallback=FallbackSpec(keep_modules=tuple(keep_modules)))

    def prune(fqn, w, st, _recipe):
        weight, _, note = prune_linear(fqn, w, st, spec, None)
        return PrunedWeight(weight), note

    cal = LayerwiseCalibration(calibration, recipe, seed=seed, progress=progress, linear_fn=prune)
    cal.collect(model)            # restores the float weights at the end
    report = SparsityReport(spec)
    zeros = total = 0
    with torch.no_grad():
        for fqn, result in cal.results.items():
            weight = result.qweight.weight
            found = linear_orientation(model.get_submodule(fqn), weight.shape[1])
            if found is None:
                raise CalibrationError(f"sparsify: {fqn} is no longer a linear of {weight.shape[1]} input channels")
            param, transposed = found
            param.copy_((weight.t() if transposed else weight).to(param.dtype))
            if not is_semi_structured(weight.to(param.dtype).float(), spec.n, spec.m):
                raise CalibrationError(f"sparsify: {fqn} lost its {spec.pattern} pattern when written back in "
                                       f"{param.dtype}")
            report.pruned[fqn] = result.note
            zeros += int((weight == 0).sum())
            total += weight.numel()
        for key, weights, note in _pruned_experts(model, recipe, spec, cal.expert_results):
            module, name = model.get_submodule(key.rpartition(".")[0]), key.rpartition(".")[2]
            param = getattr(module, name)
            transposed = getattr(module, LAYOUT_ATTR)
            dense = torch.stack([w.t() if transposed else w for w in weights]).to(param.dtype)
            if not all(is_semi_structured(w.to(param.dtype).float(), spec.n, spec.m) for w in weights):
                raise CalibrationError(f"sparsify: {key} lost its {spec.pattern} pattern when written back in "
                                       f"{param.dtype}")
            param.copy_(dense)
            report.pruned[key] = note
            zeros += sum(int((w == 0).sum()) for w in weights)
            total += sum(w.numel() for w in weights)
    report.zeros = zeros / max(total, 1)
    report.seconds = time.perf_counter() - start
    return report


def _pruned_experts(model: torch.nn.Module, recipe: Recipe, spec: SparseGPTSpec, results: dict):
    """``(key, [pruned [N, K] weight per expert], note)`` for each fused expert weight ``recipe`` takes: SparseGPT's
    per-expert results from layer-by-layer calibration (``results``), or each expert pruned by magnitude."""
    for fqn, module, name, p in fused_expert_weights(model):
        key = f"{fqn}.{name}" if fqn else name
        if float_reason(module, key, p, recipe):
            continue
        transposed = getattr(module, LAYOUT_ATTR)
        if key in results:
            weights, note = results[key]
            yield key, [pw.weight.float() for pw in weights], note
            continue
        experts = [(p[e].t() if transposed else p[e]).detach().float() for e in range(p.shape[0])]
        check_prunable(key, experts[0].shape[1], spec)
        yield key, [magnitude_prune(w, spec.n, spec.m)[0] for w in experts], f"magnitude {spec.pattern}, expert by expert"
