"""Layer-by-layer calibration: one decoder block at a time, each fed the outputs of the blocks
before it as already quantized (GPTQ's sequential mode, llm-compressor's sequential pipeline).

The decoder blocks are found from the module tree, not from names: the ``ModuleList`` of
same-typed children holding the most parameters. The float model runs up to the first block
to capture its inputs (and the statistics of linears before it); then for each block:

1. run it on the captured inputs with hooks on its linears (input statistics, Hessians);
2. quantize its linears (AWQ scale per group of linears sharing an input, then GPTQ / AWQ
   clipping / RTN by ``qcompiler.algorithms.registry``), keeping each ``QuantizedWeight``;
   With a block-tuning algorithm (SignRound), the block's quantized linears are then tuned together
   against the block's float outputs on the captured inputs (``WeightAlgorithm.tune_block``);
3. put the block's dequantized weights in place (and fake-quantize dynamic activations) and run
   it again: its outputs are the next block's inputs;
4. put the block's float weights back and drop its Hessians.

With a float-model target (``GPTQSpec.target``) a second stream of activations runs through the float blocks beside
the quantized one (``float_reference``). With ``true_sequential`` as well, each block runs that float stream once,
keeping its linears' inputs (up to ``float_cache_bytes``), and then one quantized-stream pass per dependency level,
each observing only that level's linears: the same statistics, bit for bit, as rerunning both streams per level.

Calibration state alive at once is one block's Hessians and the captured activations, not
every linear's (``peak_state_bytes`` and ``activation_bytes`` measure them). Weights are swapped by
assignment, never written into: the float tensors stay as they are (memory-mapped ones stay on disk,
``qcompiler.calibration.offload``), and no copy of the model's weights is kept. With
``execution_device`` each block moves there for its turn and back after it (the captured activations
live there), so that device holds one block at a time; results and statistics come back to the
model's device. The graph passes take the kept weights by module path (``results``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from tqdm.auto import tqdm

from qcompiler.core import layer_quant
from qcompiler.core.linear_probe import find_routers, linear_orientation
from qcompiler.algorithms import registry as weight_algorithms
from qcompiler.calibration import distributed as dd
from qcompiler.calibration.offload import release_free_memory, write_mapped
from qcompiler.calibration.statistics import (LayerStats, StatsAccumulator, hessian_from, observe_linear_inputs,
                                              reduce_accumulators, run_batches, validate_batches)
from qcompiler.errors import CalibrationError
from qcompiler.core.layer_quant import QuantizedWeight
from qcompiler.calibration.expert_inputs import (block_fused_experts, expert_key, experts_note, quantize_experts,
                                                 record_expert_inputs)
from qcompiler.core.expert_activations import ActQuantWeight
from qcompiler.calibration.float_reference import float_target_weight, paired_linear_inputs
from qcompiler.calibration.sequential import called_once, dependency_levels, stop_when_called
from torch.utils._pytree import tree_leaves, tree_map_only
from qcompiler.recipes import Recipe

__all__ = ["LayerwiseCalibration", "LayerResult", "find_decoder_blocks"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LayerResult:
    """What layer-by-layer calibration decided for one linear."""

    qweight: QuantizedWeight        # of ``W * scale`` (columns), rows as in the module
    scale: torch.Tensor | None      # AWQ input scale (x / scale), or None
    alpha: float | None
    note: str


def find_decoder_blocks(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """The repeated blocks: the ``ModuleList`` of same-typed children with the most parameters."""
    best, best_params = None, 0
    for path, m in model.named_modules():
        if not isinstance(m, torch.nn.ModuleList) or len(m) < 1:
            continue
        if len({type(c) for c in m}) != 1:
            continue
        n = sum(p.numel() for p in m.parameters())
        if n > best_params:
            best, best_params = (path, m), n
    if best is None:
        raise CalibrationError("layer-by-layer calibration found no list of repeated blocks in the model "
                               "(a torch.nn.ModuleList of same-typed modules); set recipe.layerwise=False")
    return best


class _StopForward(Exception):
    pass


class LayerwiseCalibration:
    """Drop-in for ``CalibrationCache``: ``collect(model)`` returns per-linear ``LayerStats``
    (block linears seeing quantized predecessors) and fills ``results`` with each block
    linear's quantized weight."""

    def __init__(self, batches: Iterable, recipe: Recipe, seed: int = 0, progress: bool = True,
                 replay_batch: int = 8, checkpoint_dir: str | os.PathLike | None = None,
                 linear_fn=None, execution_device: str | torch.device | None = None,
                 samples_dir: str | os.PathLike | None = None, float_cache_bytes: int = 4 << 30):
        self.batches = validate_batches(batches)
        # (fqn, w, stats, recipe) -> (weight, note): the recipe's weight algorithm unless given
        # (``qcompiler.sparsity.sparsify`` prunes in float with its own); the weight needs ``dequantize()``
        self.linear_fn = linear_fn or weight_algorithms.quantize_linear
        # each completed block's results are saved here; a rerun resumes after the last one (resume.py)
        self.checkpoint_dir = checkpoint_dir
        self.resumed_blocks = 0
        self.replay_batch = replay_batch   # captured inputs replayed per block in groups of this many
        # where each block runs (one at a time); None: where the model is
        self.execution_device = None if execution_device is None else torch.device(execution_device)
        # each block's sampled input rows are written here and memory-mapped (offload.write_mapped); None: in memory
        self.samples_dir = None if samples_dir is None else Path(samples_dir)
        # with a float-model target and ``true_sequential``: a block's float-stream linear inputs are kept (up to
        # this many bytes, estimated from its first call) so its level passes run the quantized stream only;
        # over it (or 0), each level pass reruns the float stream. The results are the same bits either way.
        self.float_cache_bytes = float_cache_bytes
        self.kept_float_blocks = 0     # blocks whose float-stream inputs were kept (the others reran it)
        self.experts_computed = 0      # fused experts this rank quantized (under a process group: its share)
        self.recipe = recipe
        self.samples_per_layer = recipe.samples_per_layer
        self.seed = seed
        self.progress = progress
        self.stats: dict[str, LayerStats] | None = None
        self.results: dict[str, LayerResult] = {}
        # fused mixture-of-experts weights calibrated per expert: {key: ([QuantizedWeight per expert], note)}
        self.expert_results: dict[str, tuple[list, str]] = {}
        self._expert_stats: dict[str, LayerStats] = {}
        self.seconds = 0.0
        self.peak_state_bytes = 0      # largest one-block statistics (Hessians, samples) alive at once
        self.activation_bytes = 0      # captured block inputs (replayed per block)
        self.blocks_path = ""
        self.world = dd.World()
        self._source_rank = 0
        self._partial_xtx: dict[str, torch.Tensor] = {}   # this rank's X^T X of the block, before the reduce
        # with a float-model target: the block's 2/n X_q^T X_f per linear (float_reference)
        self._float_cross: dict[str, torch.Tensor] = {}
        self._float_stream = [False]    # set while a block runs the float stream (_float_pass)
        self.end_to_end = None          # EndToEndSummary when recipe.end_to_end tuned the scales

    def check_vocabulary(self, model: torch.nn.Module) -> None:
        from qcompiler.calibration.statistics import CalibrationCache
        CalibrationCache.check_vocabulary(self, model)   # same checks, same messages

    def collect(self, model: torch.nn.Module) -> dict[str, LayerStats]:
        if self.stats is not None:
            return self.stats
        self.check_vocabulary(model)
        t0 = time.perf_counter()
        self.blocks_path, blocks = find_decoder_blocks(model)
        hessian = weight_algorithms.needs_hessian(self.recipe)
        tuner = weight_algorithms.block_tuner(self.recipe)
        fits_float = weight_algorithms.fits_float_model(self.recipe)
        sequential = weight_algorithms.true_sequential(self.recipe)
        start_fits = weight_algorithms.start_fits_float_model(self.recipe)
        world = self.world = dd.current_world()
        if world.active and tuner is not None:
            raise CalibrationError(f"recipe {self.recipe.name!r}: block tuning "
                                   f"({type(tuner[1]).__name__}) does not run under torch.distributed yet "
                                   f"({world.size} ranks); run it in one process")
        if world.active and self.recipe.end_to_end is not None:
            raise CalibrationError(f"recipe {self.recipe.name!r}: end-to-end scale tuning (recipe.end_to_end) does "
                                   f"not run under torch.distributed yet ({world.size} ranks); run it in one process")
        # whole replay groups per rank: every block call computes on the same tensors at any rank count
        local, offset = dd.shard_batches(self.batches, world, self.replay_batch)
        progress = self.progress and world.is_writer
        inputs: list[tuple[tuple, dict]] = []

        def capture(module, args, kwargs):
            inputs.append((args, dict(kwargs)))
            raise _StopForward   # nothing after the first block is needed yet

        block_prefix = self.blocks_path + "."
        h = blocks[0].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            with observe_linear_inputs(model, self.samples_per_layer, len(self.batches), self.seed, hessian,
                                       skip_prefix=block_prefix, index_offset=offset) as acc:
                for b in local:
                    try:
                        run_batches(_no_cache(model), [b], False)
                    except _StopForward:
                        pass
        finally:
            h.remove()
        if len(inputs) != len(local):
            raise CalibrationError(f"layer-by-layer calibration: the first block ran on {len(inputs)} of "
                                   f"{len(local)} batches")
        acc = reduce_accumulators(acc, world, "the layers before the first block", hessian)
        stats = {p: a.finish(self.samples_per_layer) for p, a in acc.items()}
        inputs = _merge_compatible(inputs, self.replay_batch)
        # block calls (merged inputs) on each rank: this rank's first global call index, and the total
        calls = dd.all_gather_objects(world, len(inputs), "gather of block-call counts", "the first block")
        call_offset, n_calls = sum(calls[:world.rank]), sum(calls)
        self._source_rank = next((r for r, c in enumerate(calls) if c), 0)
        if self.execution_device is not None:
            inputs = _to(inputs, self.execution_device)
        # the float model's activations beside the quantized model's (the same before the first block)
        float_inputs = inputs if fits_float else None
        ckpt, resume_at = self._open_checkpoints(model, len(blocks))
        for i, block in enumerate(tqdm(blocks, desc="layer-by-layer", disable=not progress, leave=False)):
            prefix = f"{block_prefix}{i}"
            swaps: list[tuple] = []      # (module, name, tensor to put back), undone in reverse order
            try:
                home = self._onload(block, swaps)
                if i < resume_at:     # completed by an earlier run: its saved weights, then its outputs
                    if float_inputs is not None:
                        float_inputs = self._propagate(block, float_inputs)
                    results, block_stats = ckpt.load(i, LayerResult)
                    results = self._restore_experts(block, prefix, results, swaps)
                    hooks = self._restore_block(block, prefix, results, swaps)
                    try:
                        inputs = self._propagate(block, inputs)
                    finally:
                        for hk in hooks:
                            hk.remove()
                    self.results.update(results)
                    stats.update(self._spill_samples(i, block_stats))
                    continue
                # with a float-model target and levels: the float stream alone first, its linear inputs kept, and
                # each level (the first too) observed on a quantized-stream pass of its own
                kept = self._record_float_stream(block, prefix, float_inputs) \
                    if float_inputs is not None and sequential and hessian and start_fits else None
                recorded = None
                if kept is not None:
                    float_outputs, keys, recorded, cache_bytes = kept
                    widths = {f: queue[0][1].shape[1] for call in recorded for f, queue in call.items()}
                    block_stats = {}
                else:
                    block_stats, keys, state, float_outputs = self._observe(
                        block, prefix, inputs, hessian, keep_outputs=tuner is not None, n_calls=n_calls,
                        call_offset=call_offset, float_inputs=float_inputs)
                    widths = {f: st.absmax.shape[0] for f, st in block_stats.items()}
                    self.peak_state_bytes = max(self.peak_state_bytes, state)
                block_float_inputs = float_inputs
                if float_inputs is not None:
                    float_inputs = _with_hidden(float_inputs, float_outputs)
                self.activation_bytes = max(self.activation_bytes, _tensor_bytes(inputs))
                modules, group_list = self._linear_groups(block, prefix, widths, keys, inputs)
                del keys
                levels, once = self._levels(block, prefix, modules, group_list, inputs) if sequential \
                    else ([list(range(len(group_list)))], set())
                # observed linears in no group (kept in float, routers): observed with the first level
                grouped = {f for g in group_list for f in g}
                unquantized = {f for f in widths if f not in grouped}
                hooks, quantized = [], {}
                for level, indices in enumerate(levels):
                    groups = [group_list[j] for j in indices]
                    if level or recorded is not None:
                        # the linears of this level, on a pass with the levels before it quantized
                        done = [f for earlier in levels[:level] for j in earlier for f in group_list[j]]
                        originals = {f[len(prefix) + 1:] + ".weight": modules[f][1] for f in done}
                        members = {f for g in groups for f in g} | (unquantized if level == 0 else set())
                        st, _, state, _ = self._observe(
                            block, prefix, inputs, hessian, n_calls=n_calls, call_offset=call_offset,
                            float_inputs=None if recorded is not None else block_float_inputs,
                            float_recorded=recorded, only=members, float_params=originals,
                            stop_after=members if members <= once else None)
                        block_stats.update(st)
                        self.peak_state_bytes = max(self.peak_state_bytes,
                                                    state + (cache_bytes if recorded is not None else 0))
                    new_hooks, new_quantized = self._quantize_groups(prefix, modules, groups, block_stats, swaps)
                    hooks += new_hooks
                    quantized.update(new_quantized)
                del block_float_inputs, recorded, kept
                block_stats = {f: block_stats[f] for f in widths if f in block_stats}   # the block's call order
                expert_results = self._quantize_experts(block, prefix, swaps, home)
                if tuner is not None and quantized:
                    self._tune_block(block, prefix, i, inputs, float_outputs, quantized, tuner)
                del float_outputs
                try:
                    inputs = self._propagate(block, inputs)
                finally:
                    for hk in hooks:
                        hk.remove()
                for fqn, st in block_stats.items():
                    st.hessian = None    # done with this block: keep the bounded part only
                    stats[fqn] = _to(st, home)
                stats.update(self._spill_samples(i, {f: stats[f] for f in block_stats}))
                mine = [f for f in self.results if f.startswith(prefix + ".")]
                self.results.update({f: _to(self.results[f], home) for f in mine})
                if ckpt is not None:
                    ckpt.save(i, {**{f: self.results[f] for f in mine}, **expert_results},
                              {f: stats[f] for f in block_stats})
            finally:
                for module, name, tensor in reversed(swaps):
                    _assign(module, name, tensor)
                del swaps
                release_free_memory()   # the block's transient tensors: back to the OS, not kept as heap
        if self.recipe.end_to_end is not None and self.results:
            self._tune_end_to_end(model, progress)
        if "output_head" not in self.recipe.fallback.keep_op_kinds:
            # the output head is quantized: its inputs (after the last block) come from one float pass
            with observe_linear_inputs(model, self.samples_per_layer, len(self.batches), self.seed, hessian,
                                       skip_prefix=block_prefix, index_offset=offset) as acc:
                run_batches(_no_cache(model), local, progress, desc="calibrating (after blocks)")
            acc = reduce_accumulators(acc, world, "the layers after the last block", hessian)
            stats.update({p: a.finish(self.samples_per_layer) for p, a in acc.items() if p not in stats})
        self.stats = stats
        self.seconds = time.perf_counter() - t0
        log.info("layer-by-layer calibration: %d blocks, %d linears quantized in %.1f s, peak state %.1f MB "
                 "+ activations %.1f MB%s", len(blocks), len(self.results), self.seconds, self.peak_state_bytes / 1e6,
                 self.activation_bytes / 1e6,
                 f"; {self.kept_float_blocks} blocks kept their float-stream inputs" if self.kept_float_blocks else "")
        return stats

    def _tune_end_to_end(self, model: torch.nn.Module, progress: bool) -> None:
        """The blocks' quantized scales tuned together against the float model's outputs (``recipe.end_to_end``,
        ``qcompiler.calibration.end_to_end``); the model holds its float weights again here: it is the teacher."""
        from qcompiler.calibration.end_to_end import tune_scales_end_to_end
        qweights = {f: (r.qweight, r.scale) for f, r in self.results.items()}
        tuned, summary = tune_scales_end_to_end(model, qweights, self.batches, self.recipe.end_to_end,
                                                progress)
        what = "scales tuned end to end" if summary.kept else "end-to-end scale tuning not kept (probe KL rose)"
        for f, qw in tuned.items():
            r = self.results[f]
            self.results[f] = dataclasses.replace(r, qweight=qw, note=f"{r.note}; {what}")
        self.end_to_end = summary
        log.info("layer-by-layer calibration: %s", summary.text())

    def _spill_samples(self, index: int, block_stats: dict[str, LayerStats]) -> dict[str, LayerStats]:
        """With ``samples_dir``: the block's statistics with their sampled rows (CPU) written to
        ``samples-NNNNN.safetensors`` and memory-mapped from it (the same bits); else as they are."""
        if self.samples_dir is None:
            return block_stats
        rows = {f: st.samples for f, st in block_stats.items() if st.samples.device.type == "cpu"}
        if not rows:
            return block_stats
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        suffix = f"-rank{self.world.rank}" if self.world.active else ""
        mapped = write_mapped(self.samples_dir / f"samples-{index:05d}{suffix}.safetensors", rows)
        return {f: dataclasses.replace(st, samples=mapped[f]) if f in mapped else st for f, st in block_stats.items()}

    def _open_checkpoints(self, model, n_blocks: int):
        """The per-block checkpoint folder (or None) and the number of blocks to take from it: the
        blocks every rank finds saved."""
        if self.checkpoint_dir is None:
            return None, 0
        from qcompiler.calibration.resume import BlockCheckpoints, fingerprint
        ckpt = BlockCheckpoints(self.checkpoint_dir,
                                fingerprint(model, self.recipe, self.batches, self.seed, self.replay_batch),
                                writer=self.world.is_writer)
        if self.world.active:     # the writer creates the folder and its manifest before anyone reads it
            dd.collective(self.world, "barrier", "the checkpoint folder", torch.distributed.barrier)
        found = dd.all_gather_objects(self.world, ckpt.completed(n_blocks), "gather of completed blocks",
                                      "the checkpoint folder")
        self.resumed_blocks = min(found)
        if self.resumed_blocks:
            log.info("layer-by-layer calibration: resuming after block %d of %d from %s", self.resumed_blocks,
                     n_blocks, self.checkpoint_dir)
        return ckpt, self.resumed_blocks

    def _onload(self, block, swaps: list) -> torch.device:
        """Move the block to ``execution_device`` (recording in ``swaps`` what to put back); the device
        its weights came from."""
        first = next(iter(block.parameters()), None)
        home = first.device if first is not None else torch.device("cpu")
        dev = self.execution_device
        if dev is None:
            return home
        moved: dict[int, torch.Tensor] = {}
        for module in block.modules():
            for table in (module._parameters, module._buffers):
                for name, t in list(table.items()):
                    if t is None or t.device == dev:
                        continue
                    if id(t) not in moved:
                        copy = t.detach().to(dev)
                        moved[id(t)] = torch.nn.Parameter(copy, requires_grad=t.requires_grad) \
                            if isinstance(t, torch.nn.Parameter) else copy
                    swaps.append((module, name, t))
                    _assign(module, name, moved[id(t)])
        return home

    def _restore_block(self, block, prefix, results: dict, swaps: list) -> list:
        """Put a completed block's saved weights in place (as ``_quantize_block`` did); its hooks."""
        hooks = []
        for fqn, result in results.items():
            module = block.get_submodule(fqn[len(prefix) + 1:])
            found = linear_orientation(module, result.qweight.shape[1])
            if found is None:
                raise CalibrationError(f"layer-by-layer checkpoint: {fqn} is no longer a linear of "
                                       f"{result.qweight.shape[1]} input channels")
            hooks += self._install(module, *found, result, swaps)
        return hooks

    def _install(self, module, param, transposed: bool, result: LayerResult, swaps: list) -> list:
        """Put ``result``'s dequantized weight in the place of ``param`` (recording the original in ``swaps``);
        the hook that fake-quantizes a dynamic activation, if any."""
        s = result.scale
        eff = result.qweight.to(param.device).dequantize()
        if s is not None:
            s = s.to(param.device)
            eff = eff / s[None, :]
        swaps.append((module, "weight", param))
        _put_weight(module, param, eff, transposed)
        act = self.recipe.activation
        return [module.register_forward_pre_hook(_fake_quant_input(act, s, self._float_stream))] \
            if act is not None and act.dynamic else []

    @contextlib.contextmanager
    def _float_pass(self):
        """The block runs the float stream: the activation hooks of linears already quantized stand aside."""
        self._float_stream[0] = True
        try:
            yield
        finally:
            self._float_stream[0] = False

    def _record_float_stream(self, block, prefix, float_inputs: list):
        """The block on the float stream alone, each call's linear inputs kept (``paired_linear_inputs.take``):
        ``(float outputs, input keys, [kept inputs per call], bytes kept)``; or None when the block has fused
        experts (their pass records expert inputs), under a process group, or when the kept inputs would exceed
        ``float_cache_bytes`` (estimated from the first call, scaled by the calls' sizes). Under a process group
        the ranks agree (``_fits_everywhere``; a rank without inputs or budget votes no): every rank takes one path."""
        if block_fused_experts(block, prefix, self.recipe):
            return None     # the same on every rank: the model's
        if self.float_cache_bytes <= 0 or not float_inputs:
            self._fits_everywhere(math.inf, prefix)
            return None
        keys: dict[str, torch.Tensor] = {}
        pairs = paired_linear_inputs(block, prefix)
        key_hooks = _record_input_keys(block, prefix, keys)
        recorded, outputs, kept = [], [], 0
        try:
            with torch.inference_mode(), self._float_pass():
                for c, (args, kwargs) in enumerate(float_inputs):
                    with pairs.recording():
                        outputs.append(_hidden_out(block(*args, **kwargs)))
                    recorded.append(pairs.take())
                    if c == 0:
                        kept = _kept_bytes(recorded)
                        sizes = [_hidden(*call).numel() for call in float_inputs]
                        if not self._fits_everywhere(kept * sum(sizes) / max(sizes[0], 1), prefix):
                            return None
        finally:
            for hk in key_hooks:
                hk.remove()
            pairs.__exit__(None, None, None)
        kept = _kept_bytes(recorded)
        self.kept_float_blocks += 1
        return outputs, keys, recorded, kept

    def _fits_everywhere(self, estimate: float, prefix: str) -> bool:
        """Whether every rank's estimate of the bytes it would keep is within its own ``float_cache_bytes`` (the
        largest ratio, all-reduced: one answer on every rank)."""
        ratio = estimate / self.float_cache_bytes if self.float_cache_bytes > 0 else math.inf
        worst = dd.all_reduce_(self.world, torch.tensor([ratio], dtype=torch.float64), "max",
                               "the agreement on keeping the float stream's inputs", f"block {prefix}")
        return float(worst) <= 1.0

    def _observe(self, block, prefix, inputs, hessian, keep_outputs: bool = False, n_calls: int | None = None,
                 call_offset: int = 0, float_inputs: list | None = None, only: set[str] | None = None,
                 float_params: dict | None = None, stop_after: set[str] | None = None,
                 float_recorded: list[dict] | None = None):
        """Run the block on the captured inputs, accumulating its linears' statistics; the statistics,
        input keys, state bytes and the block's outputs (``keep_outputs``). With ``float_inputs`` (the float
        model's activations, call for call) the block also runs on those, each call just before the quantized
        stream's, and the outputs returned are the float stream's; with Hessians and no block tuner, each
        linear's ``X_q^T X_f`` lands in ``_float_cross``. ``only``: the linears to observe (a later level of
        ``true_sequential``: no fused experts, no input keys); ``float_params``: the float weights of the linears
        already quantized in place, which the float stream runs with; ``stop_after``: linears after which each
        call stops (their inputs are all that is needed; no outputs are returned); ``float_recorded``: instead of
        ``float_inputs``, the float stream's linear inputs of each call as ``_record_float_stream`` kept them (the
        float stream does not run; no outputs are returned)."""
        keys: dict[str, tuple] = {}
        # fused experts: each expert's Hessian, from the tokens routed to it (Hessian-based algorithms only)
        experts = block_fused_experts(block, prefix, self.recipe) if hessian and only is None else {}
        observe = observe_linear_inputs(block, self.samples_per_layer, n_calls or len(inputs), self.seed, hessian,
                                        prefix, index_offset=call_offset, only=only)
        record = record_expert_inputs(experts)
        # GPTQ fitted to the float model's output (W*); a block tuner fits the float stream's block outputs,
        # from its start (GPTQ's W* only when the start itself is fitted to the float model: SignRound from GPTAQ)
        pairs = paired_linear_inputs(block, prefix, only) if (float_inputs is not None or float_recorded is not None) \
            and hessian and weight_algorithms.start_fits_float_model(self.recipe) else None
        outs, float_outs = [], []
        first_inputs = _record_input_keys(block, prefix, keys) if only is None else []
        stopper = stop_when_called(block, prefix, stop_after, _StopForward) if stop_after else None

        def call(fn):
            if stopper is None:
                return fn()
            stopper.reset()
            try:
                fn()
            except _StopForward:
                pass
            return None
        try:
            with torch.inference_mode(), stopper or contextlib.nullcontext():
                for c, (args, kwargs) in enumerate(inputs):
                    if float_inputs is not None:     # statistics hooks off: only the pairing records
                        fargs, fkwargs = float_inputs[c]
                        with pairs.recording() if pairs is not None else contextlib.nullcontext(), \
                                self._float_pass():
                            out = call(lambda: torch.func.functional_call(block, float_params, fargs, fkwargs,
                                                                          strict=False)
                                       if float_params else block(*fargs, **fkwargs))
                            if out is not None:
                                float_outs.append(_hidden_out(out))
                    with observe, record, pairs.pairing(None if float_recorded is None else float_recorded[c]) \
                            if pairs is not None else contextlib.nullcontext():
                        out = call(lambda: block(*args, **kwargs))
                        if out is not None:
                            outs.append(out)
        finally:
            for hk in first_inputs:
                hk.remove()
            if pairs is not None:
                pairs.__exit__(None, None, None)
        acc, expert_acc = observe.acc, record.acc
        if experts:
            expert_acc = reduce_accumulators(expert_acc, self.world, f"block {prefix} (experts)", True)
            self._expert_stats = {k: a.finish(0) for k, a in expert_acc.items()}
        # under a process group each group's X^T X is summed onto the rank that quantizes it (_quantize_block)
        deferred = self.world.active and hessian
        acc = reduce_accumulators(acc, self.world, f"block {prefix}", hessian, reduce_hessians=not deferred)
        state = sum(_acc_bytes(a) for a in acc.values())
        if deferred:
            self._partial_xtx = {p: a.xtx for p, a in acc.items()}
            for a in acc.values():
                a.xtx = None
        self._float_cross = {}
        if pairs is not None:
            for p, a in acc.items():     # every rank's modules, in one order (a rank without rows adds zeros)
                k = a.absmax.shape[0]
                cross = pairs.cross.get(p)
                if cross is None:
                    cross = torch.zeros(k, k, dtype=torch.float64, device=a.absmax.device)
                if self.world.active:
                    dd.all_reduce_(self.world, cross, "sum", "all-reduce of X_q^T X_f", f"block {prefix}, {p}")
                self._float_cross[p] = hessian_from(cross, a.tokens)
        if float_inputs is not None:
            outputs = float_outs
        else:
            outputs = [_hidden_out(o) for o in outs] if keep_outputs else None
        del outs
        return {p: a.finish(self.samples_per_layer) for p, a in acc.items()}, keys, state, outputs

    def _linear_groups(self, block, prefix, widths: dict[str, int], keys, inputs) -> tuple[dict, list[list[str]]]:
        """The block's linears to quantize (``{fqn: (module, weight, transposed)}``, routers and kept modules
        left out) and their groups (linears reading one input), in the order of the block's calls as the
        first rank that ran inputs saw them. ``widths``: the observed modules' input widths, in call order."""
        groups: dict[str, list[str]] = {}
        modules = {}
        for fqn, k in widths.items():
            module = block.get_submodule(fqn[len(prefix) + 1:]) if fqn != prefix else block
            found = linear_orientation(module, k)
            if found is None or self._kept(fqn):
                continue
            modules[fqn] = (module, *found)
        for fqn in self._routers(block, prefix, modules, inputs):
            del modules[fqn]            # the graph keeps routers in float: so does calibration
        for fqn in modules:
            x = keys.get(fqn)
            owner = next((f for f in groups if x is not None and keys.get(f) is x), fqn)
            groups.setdefault(owner, []).append(fqn)
        group_list = dd.broadcast_object(self.world, list(groups.values()), self._source_rank,
                                         "broadcast of the linear groups", f"block {prefix}")
        return modules, group_list

    def _levels(self, block, prefix, modules, group_list, inputs) -> tuple[list[list[int]], set[str]]:
        """``true_sequential``'s levels: lists of indices into ``group_list``, each group one level after the
        deepest group whose weights change its input (``dependency_levels``), and the linears the block calls
        once per call (a level's pass may stop when they have run), both from the first sequence of the first
        replayed call on the first rank that ran inputs, broadcast."""
        found = None
        if self.world.rank == self._source_rank:
            args, kwargs = _one_sequence(inputs[0])
            found = (dependency_levels(block, prefix, [[(f, modules[f][1]) for f in g] for g in group_list],
                                       args, kwargs),
                     called_once(block, prefix, [f for g in group_list for f in g], args, kwargs))
        return dd.broadcast_object(self.world, found, self._source_rank, "broadcast of the sequential levels",
                                   f"block {prefix}")

    def _quantize_groups(self, prefix, modules, group_list, block_stats, swaps) -> tuple[list, dict]:
        """The weight algorithm on ``group_list``'s linears (each group's work on one rank, by cost; results
        broadcast), their dequantized weights put in place (recorded in ``swaps``); the activation hooks and,
        for a block tuner, ``{fqn: (module, weight, transposed, float32 weight)}``."""
        hooks = []
        quantized: dict[str, tuple] = {}
        world = self.world
        modules = {f: modules[f] for g in group_list for f in g}
        # float32 copies: what the algorithms work on (a block tuner starts from them too)
        weights = {f: (m[1].t() if m[2] else m[1]).detach().float().clone() for f, m in modules.items()}
        # units of work: a group, or a slice of its output rows when the group alone outweighs a rank's share
        units = self._units(group_list, weights)
        owners = dd.assign_by_cost([_group_cost([_rows(weights[f], i, n) for f in group_list[j]])
                                    for j, i, n in units], world)
        group_owners: dict[int, set[int]] = {}
        for (j, _, _), o in zip(units, owners):
            group_owners.setdefault(j, set()).add(o)
        self._reduce_hessians(prefix, group_list, group_owners, block_stats)
        own = {u: self._quantize_group(group_list[j], {f: _rows(weights[f], i, n) for f in group_list[j]}, block_stats)
               for u, (j, i, n) in enumerate(units) if owners[u] == world.rank}
        done = dict(own)
        if world.active:
            for r in range(world.size):
                done.update(dd.broadcast_object(world, own if r == world.rank else None, r,
                                                "broadcast of quantized weights", f"block {prefix}"))
        for j, fqns in enumerate(group_list):
            parts = [done[u] for u, (g, _, _) in enumerate(units) if g == j]
            for fqn in fqns:
                self.results[fqn] = result = _join_rows([part[fqn] for part in parts])
                module, param, transposed = modules[fqn]
                hooks += self._install(module, param, transposed, result, swaps)
                if result.scale is None:
                    quantized[fqn] = (module, param, transposed, weights[fqn])
        return hooks, quantized

    def _quantize_experts(self, block, prefix, swaps, home) -> dict[str, LayerResult]:
        """The weight algorithm on each expert of the block's fused expert weights, from its own Hessian (an
        expert no calibration token reached: round to nearest, noted); their dequantized weights put in place
        for the next blocks (recorded in ``swaps``). Under a process group each expert is computed on one rank
        (``quantize_experts``). Returns the block's per-expert results, for the block checkpoint."""
        experts = block_fused_experts(block, prefix, self.recipe) if self._expert_stats else {}
        stats, self._expert_stats = self._expert_stats, {}
        done, computed = quantize_experts(experts, stats, self.recipe, self.linear_fn, self.world, f"block {prefix}")
        self.experts_computed += computed
        out = {}
        for key, (module, name, transposed) in experts.items():
            count = getattr(module, name).shape[0]
            qws = [done[expert_key(key, e)][0] for e in range(count)]
            for e in range(count):
                out[expert_key(key, e)] = LayerResult(qws[e], None, None, done[expert_key(key, e)][1])
            self._put_experts(module, name, transposed, qws, swaps)
            self.expert_results[key] = ([qw.to(home) for qw in qws],
                                        experts_note({f: r.note for f, r in out.items()}, key, count))
        return out

    def _put_experts(self, module, name, transposed, qws, swaps) -> None:
        p = getattr(module, name)
        dense = torch.stack([(qw.to(p.device).dequantize(p.dtype).t() if transposed else
                              qw.to(p.device).dequantize(p.dtype)) for qw in qws])
        swaps.append((module, name, p))
        act = self.recipe.activation     # dynamic here (block_fused_experts): the next blocks see it as the model will
        _assign(module, name, torch.nn.Parameter(dense, requires_grad=False) if act is None else
                ActQuantWeight(dense, act))

    def _restore_experts(self, block, prefix, results: dict, swaps: list) -> dict:
        """Put a completed block's saved per-expert results in place (as ``_quantize_experts`` did); the other
        results."""
        experts = block_fused_experts(block, prefix, self.recipe)
        for key, (module, name, transposed) in experts.items():
            count = getattr(module, name).shape[0]
            found = [results.get(expert_key(key, e)) for e in range(count)]
            if any(r is None for r in found):
                raise CalibrationError(f"layer-by-layer checkpoint: block {prefix} lacks the per-expert results of "
                                       f"{key}: written by another version? Remove the checkpoint folder")
            qws = [r.qweight for r in found]
            self._put_experts(module, name, transposed, qws, swaps)
            self.expert_results[key] = (qws, experts_note({expert_key(key, e): r.note for e, r in enumerate(found)},
                                                          key, count))
        return {f: r for f, r in results.items() if not f.endswith("]")}

    def _units(self, group_list: list, weights: dict) -> list[tuple[int, int, int]]:
        """``(group index, slice index, slices)`` per unit of work: slice ``i`` of ``n`` holds rows
        ``[N i / n, N (i + 1) / n)`` of each of the group's linears. Under a process group, a group whose cost exceeds a
        rank's share of the block is cut into slices of output rows (up to one per rank), when the algorithm
        computes each row alone given the Hessian (``WeightAlgorithm.rows_separable``: GPTQ, round to nearest)
        and the weights have a scale per row (per channel or group); the slices' results, joined, are the
        whole group's bit for bit (each row's arithmetic does not depend on the others)."""
        whole = [(j, 0, 1) for j in range(len(group_list))]
        size = self.world.size
        if size < 2 or self.linear_fn is not weight_algorithms.quantize_linear \
                or not weight_algorithms.rows_separable(self.recipe):
            return whole
        costs = [_group_cost([weights[f] for f in fqns]) for fqns in group_list]
        share = sum(costs) / size
        units = []
        for j, fqns in enumerate(group_list):
            rows = min(weights[f].shape[0] for f in fqns)
            parts = min(size, rows, max(1, math.ceil(costs[j] / share - 1e-9)))
            # a slice repeats the group's K x K factorization: only worth it when the row sweeps dominate
            k = weights[fqns[0]].shape[1]
            if parts > 1 and costs[j] - float(k) ** 3 < float(k) ** 3:
                parts = 1
            units += [(j, i, parts) for i in range(parts)]
        return units

    def _reduce_hessians(self, prefix: str, group_list: list, group_owners: dict[int, set[int]],
                         block_stats: dict) -> None:
        """Sum each group's ``X^T X`` (one per group: its linears read the same input, so their partial sums
        are equal) onto the group's owner, the only rank that reads it (every rank when the group's rows are
        split over several); the owners' linears get the Hessian."""
        partial, self._partial_xtx = self._partial_xtx, {}
        for j, fqns in enumerate(group_list):
            xtx = partial.get(fqns[0])
            if xtx is None:
                continue
            owners = group_owners[j]
            where = f"block {prefix}, {fqns[0]}"
            if len(owners) == 1:
                dd.reduce_(self.world, xtx, next(iter(owners)), "reduce of the Hessian X^T X", where)
            else:
                dd.all_reduce_(self.world, xtx, "sum", "all-reduce of the Hessian X^T X", where)
            if self.world.rank in owners:
                for f in fqns:
                    block_stats[f].hessian = hessian_from(xtx, block_stats[f].tokens)

    def _quantize_group(self, fqns: list[str], weights: dict, block_stats: dict) -> dict[str, LayerResult]:
        """The weight algorithm on one group of linears reading the same input (AWQ's shared scale first);
        with a float-model target, on each linear's ``float_target_weight``."""
        recipe = self.recipe
        ws = [weights[f] for f in fqns]
        alpha, s = weight_algorithms.input_scale(block_stats[fqns[0]], ws, recipe, ",".join(fqns))
        out = {}
        for fqn, w in zip(fqns, ws):
            st = weight_algorithms.scaled_stats(block_stats[fqn], s)
            w = w if s is None else w * s[None, :]
            cross = self._float_cross.get(fqn)
            if cross is not None and st.hessian is not None:
                if s is not None:
                    cross = cross / (s[:, None] * s[None, :]).to(cross)
                w = float_target_weight(w, st.hessian, cross, weight_algorithms.dampening(recipe), fqn,
                                        alpha=weight_algorithms.target_alpha(recipe))
            qw, note = self.linear_fn(fqn, w, st, recipe)
            out[fqn] = LayerResult(qw, s, alpha, note if cross is None else f"{note}, float-model target")
        return out

    def _tune_block(self, block, prefix, index, inputs, targets, quantized, tuner) -> None:
        """Hand the block's quantized linears to the weight algorithm's block tuner (SignRound):
        it runs the block on seeded mini-batches of the captured inputs against the float outputs."""
        from qcompiler.algorithms.signround import BlockLinear
        tune, spec = tuner
        # captured under inference_mode: autograd may not save those tensors, so tune on copies
        inputs = tree_map_only(torch.Tensor, lambda t: t.clone(), inputs)
        sizes = [_hidden(a, k).shape[0] for a, k in inputs]
        gen = torch.Generator().manual_seed(getattr(spec, "seed", 0) * 100003 + index)
        weights = torch.tensor(sizes, dtype=torch.float64)
        linears = {f: BlockLinear(f[len(prefix) + 1:] + ".weight", w, transposed, self.results[f].qweight)
                   for f, (module, param, transposed, w) in quantized.items()}

        def run(overrides, step):
            e = int(torch.multinomial(weights, 1, generator=gen))
            rows = torch.randperm(sizes[e], generator=gen)[:getattr(spec, "batch_size", sizes[e])]
            args, kwargs = inputs[e]
            h = _hidden(args, kwargs)[rows]
            args, kwargs = ((h, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": h})
            out = torch.func.functional_call(block, overrides, args, kwargs)
            return _hidden_out(out), targets[e][rows]

        def evaluate(overrides) -> float:
            total, count = 0.0, 0
            for (args, kwargs), target in zip(inputs, targets):
                out = _hidden_out(torch.func.functional_call(block, overrides, args, kwargs))
                total += float((out.float() - target.float()).pow(2).sum())
                count += target.numel()
            return total / max(count, 1)

        frozen = [p for p in block.parameters() if p.requires_grad]
        for p in frozen:
            p.requires_grad_(False)
        try:
            qweights, note = tune(run, evaluate, linears, self.recipe.weight, spec)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        for fqn, qw in qweights.items():
            module, param, transposed, _ = quantized[fqn]
            self.results[fqn] = LayerResult(qw, None, None, note)
            _put_weight(module, param, qw.dequantize(), transposed)

    def _routers(self, block, prefix, modules: dict, inputs: list) -> set[str]:
        """The block's mixture-of-experts routers among ``modules`` (kept in float when the recipe keeps op
        kind ``router``), found by following the ops of one replayed call's first sequence (``find_routers``)."""
        if "router" not in self.recipe.fallback.keep_op_kinds or not modules or not inputs:
            return set()
        args, kwargs = _one_sequence(inputs[0])
        return find_routers(lambda: block(*args, **kwargs), {f: m[0] for f, m in modules.items()})

    def _kept(self, fqn: str) -> bool:
        return any(fnmatch.fnmatchcase(fqn, g) for g in self.recipe.fallback.keep_modules)

    def _run_block(self, block, inputs) -> list:
        outs = []
        with torch.inference_mode():
            for args, kwargs in inputs:
                outs.append(block(*args, **kwargs))
        return outs

    def _propagate(self, block, inputs):
        return _with_hidden(inputs, [_hidden_out(o) for o in self._run_block(block, inputs)])


def _with_hidden(inputs: list, hiddens: list) -> list:
    """The block calls ``inputs`` with their hidden states replaced by ``hiddens`` (the next block's inputs)."""
    new = []
    for (args, kwargs), hidden in zip(inputs, hiddens):
        if args:
            new.append(((hidden, *args[1:]), kwargs))
        else:
            new.append(((), {**kwargs, "hidden_states": hidden}))
    return new


def _one_sequence(call: tuple) -> tuple:
    """A block call on its first sequence only: ``call`` with its hidden states cut to batch 1 when it is a merged
    call (``_merge_compatible``: every other tensor of two or more dimensions has batch 1, so it broadcasts);
    otherwise ``call`` itself. For structural probes, which need one sequence, not the whole batch."""
    args, kwargs = call
    hidden = _hidden(args, kwargs)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() < 2 or hidden.shape[0] == 1:
        return call
    rest = [t for t in tree_leaves((args[1:] if args else (), kwargs))
            if isinstance(t, torch.Tensor) and t is not hidden]
    if any(t.dim() >= 2 and t.shape[0] != 1 for t in rest):
        return call
    return _with_hidden([call], [hidden[:1]])[0]


def _kept_bytes(recorded: Iterable[dict]) -> int:
    """Bytes of ``paired_linear_inputs.take()``'s kept inputs: each distinct input once (q/k/v share one), and its
    float32 rows where they are a copy (another dtype, or a non-contiguous input) rather than a view."""
    seen: dict[int, int] = {}
    for call in recorded:
        for queue in call.values():
            for x, rows in queue:
                copied = x.dtype != rows.dtype or not x.is_contiguous()
                seen[id(x)] = x.numel() * x.element_size() + (rows.numel() * rows.element_size() if copied else 0)
    return sum(seen.values())


def _assign(module: torch.nn.Module, name: str, tensor) -> None:
    (module._parameters if name in module._parameters else module._buffers)[name] = tensor


def _put_weight(module: torch.nn.Module, like: torch.Tensor, eff: torch.Tensor, transposed: bool) -> None:
    """``module.weight`` becomes ``eff`` (an [N, K] float weight) in ``like``'s layout, dtype and device: a new
    tensor, so the one it replaces (float, possibly memory-mapped) is never written."""
    w = (eff.t() if transposed else eff).to(device=like.device, dtype=like.dtype).contiguous()
    module._parameters["weight"] = torch.nn.Parameter(w, requires_grad=False)


def _to(obj, device: torch.device):
    """Captured inputs, a ``LayerResult`` or ``LayerStats`` with their tensors on ``device``."""
    if isinstance(obj, LayerResult):
        return dataclasses.replace(obj, qweight=obj.qweight.to(device),
                                   scale=None if obj.scale is None else obj.scale.to(device))
    if isinstance(obj, LayerStats):
        return dataclasses.replace(obj, **{f.name: getattr(obj, f.name).to(device)
                                           for f in dataclasses.fields(obj)
                                           if isinstance(getattr(obj, f.name), torch.Tensor)})
    return tree_map_only(torch.Tensor, lambda t: t.to(device), obj)


def _rows(w: torch.Tensor, i: int, parts: int) -> torch.Tensor:
    """Rows ``[N i / parts, N (i + 1) / parts)`` of an [N, K] weight (all of it for one part)."""
    n = w.shape[0]
    return w if parts == 1 else w[n * i // parts:n * (i + 1) // parts]


def _join_rows(parts: list[LayerResult]) -> LayerResult:
    """One linear's result from its row slices' results, in order (the result itself when unsplit)."""
    if len(parts) == 1:
        return parts[0]
    qws = [p.qweight for p in parts]
    cat = lambda ts: torch.cat(ts, dim=0)   # noqa: E731
    qweight = dataclasses.replace(qws[0], q=cat([q.q for q in qws]), scale=cat([q.scale for q in qws]),
                                  zero=None if qws[0].zero is None else cat([q.zero for q in qws]))
    return dataclasses.replace(parts[0], qweight=qweight)


def _group_cost(weights: list[torch.Tensor]) -> float:
    """Relative cost of quantizing linears that share an input of K channels (GPTQ: a K x K
    factorization plus a sweep over N x K weights with K-wide updates)."""
    k = weights[0].shape[1]
    return float(k) ** 3 + float(sum(w.shape[0] for w in weights)) * k * k


def _hidden(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _hidden_out(out) -> torch.Tensor:
    """A block's output hidden states (blocks return them alone or first in a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(_same(a[n], b[n]) for n in a)
    return a is b or (type(a) is type(b) and isinstance(a, (int, float, str, bool, type(None))) and a == b)


def _merge_compatible(inputs: list, group: int) -> list:
    """Concatenate along the batch dimension runs of captured block inputs whose other arguments
    are identical (same positions, same masks: equal-length calibration sequences), so each block
    replays in fewer, larger calls. Inputs that differ in anything else stay separate."""
    merged: list = []
    run: list = []

    def flush():
        if not run:
            return
        args, kwargs = run[0]
        hidden = torch.cat([_hidden(a, k) for a, k in run], dim=0)
        merged.append(((hidden, *args[1:]), kwargs) if args else ((), {**kwargs, "hidden_states": hidden}))
        run.clear()

    def rest(a, k):
        return (a[1:] if a else a), {n: v for n, v in k.items() if n != "hidden_states"}

    for a, k in inputs:
        h = _hidden(a, k)
        if run:
            h0 = _hidden(*run[0])
            ok = (len(run) < group and h.dim() >= 2 and h.shape[0] == 1 and h0.shape[1:] == h.shape[1:]
                  and bool(a) == bool(run[0][0]) and _same(rest(a, k), rest(*run[0])))
            if not ok:
                flush()
        if h.dim() >= 2 and h.shape[0] == 1:
            run.append((a, k))
        else:
            flush()
            merged.append((a, k))
    flush()
    return merged


def _fake_quant_input(act, s, float_stream: list[bool]):
    def hook(module, args):
        if float_stream[0]:
            return None
        x = args[0]
        xs = x if s is None else x / s
        y = layer_quant.fake_quant_act(xs.float(), act, None).to(x.dtype)
        return (y if s is None else y * s, *args[1:])
    return hook


def _record_input_keys(block, prefix, keys) -> list:
    """Pre-hooks noting, on the first call, which input tensor each linear reads (shared = one group)."""
    hooks = []
    for path, m in block.named_modules():
        if any(p.dim() == 2 for p in m.parameters(recurse=False)):
            fqn = f"{prefix}.{path}" if path else prefix

            def hook(module, args, kwargs, fqn=fqn):
                x = next((a for a in list(args) + list(kwargs.values())
                          if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
                if x is not None and fqn not in keys:
                    keys[fqn] = x    # held until grouping: identity of the input tensor
            hooks.append(m.register_forward_pre_hook(hook, with_kwargs=True))
    return hooks


class _no_cache(torch.nn.Module):
    """Runs the model with ``use_cache=False`` when it takes that argument (block replays must not
    append to a KV cache)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def parameters(self, recurse: bool = True):
        return self.model.parameters(recurse)

    def forward(self, **kwargs):
        try:
            return self.model(**kwargs, use_cache=False)
        except TypeError:
            return self.model(**kwargs)


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, (tuple, list)):
        return sum(_tensor_bytes(o) for o in obj)
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(o) for o in obj.values())
    return 0


def _acc_bytes(a: StatsAccumulator) -> int:
    return _tensor_bytes([a.absmax, a.abssum, a.xtx, a.samples])
