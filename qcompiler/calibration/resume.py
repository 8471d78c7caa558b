"""Per-block checkpoints of layer-by-layer calibration: a rerun after a crash (or a killed job) resumes
after the last completed block instead of starting over.

A folder holds ``manifest.json`` (what the results depend on: the recipe, seed, replay grouping, the
calibration tokens and the model's parameters, each as a fingerprint) and one ``block-NNNNN.safetensors``
per completed block: every linear's quantized weight (codes, scales, zero-points), its AWQ input scale
and its input statistics (Hessians dropped, as layer-by-layer calibration drops them). A resumed run
recomputes the first block's inputs from the float model and replays the completed blocks with their
saved weights (forward passes only), so its results are bit-identical to an uninterrupted run's.

Files are written to a temporary name and moved into place: a block file is complete or absent. A folder
whose manifest differs from this run's (another model, recipe or calibration set) is refused, naming
what differs; delete it to start over.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qcompiler.calibration.statistics import LayerStats
from qcompiler.core.layer_quant import QuantizedWeight
from qcompiler.errors import CalibrationError

__all__ = ["BlockCheckpoints", "fingerprint"]

_FORMAT = "qcompiler-layerwise-blocks/1"
_SAMPLE = 1 << 16          # elements hashed per parameter (strided), enough to tell weights apart


def _digest(parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        if isinstance(p, torch.Tensor):
            t = p.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(str(p).encode())
    return h.hexdigest()[:24]


def _batch_tensors(batch) -> list:
    if isinstance(batch, Mapping):
        return [k for k in sorted(batch)] + [batch[k] for k in sorted(batch) if isinstance(batch[k], torch.Tensor)]
    return [batch]


def fingerprint(model: torch.nn.Module, recipe, batches: list, seed: int, replay_batch: int) -> dict[str, str]:
    """What a block's results depend on, each part hashed: a folder written under another fingerprint
    cannot be resumed. The model's parameters are hashed by name, shape, dtype and a strided sample of
    at most 65,536 values each (a whole 70B model would take minutes to hash)."""
    def params():
        for name, p in model.named_parameters():
            flat = p.detach().reshape(-1)
            yield name
            yield flat[::max(1, flat.numel() // _SAMPLE)]
    return {"format": _FORMAT, "recipe": _digest([recipe.to_json(sort_keys=True)]),
            "calibration": _digest(t for b in batches for t in _batch_tensors(b)),
            "seed": str(seed), "replay_batch": str(replay_batch), "model": _digest(params())}


class BlockCheckpoints:
    """The per-block results in ``folder`` for a run with ``fingerprint``; ``writer`` (rank 0 under
    torch.distributed) creates the folder and writes the files, every rank reads them."""

    def __init__(self, folder: str | os.PathLike, fingerprint: dict[str, str], writer: bool = True):
        self.folder = Path(folder)
        self.writer = writer
        manifest = self.folder / "manifest.json"
        if manifest.exists():
            try:
                saved = json.loads(manifest.read_text())
            except (OSError, ValueError) as e:
                raise CalibrationError(f"layer-by-layer checkpoint folder {self.folder}: manifest.json is "
                                       f"unreadable ({e}); delete the folder to start over") from None
            differ = [k for k in sorted(set(saved) | set(fingerprint)) if saved.get(k) != fingerprint.get(k)]
            if differ:
                raise CalibrationError(
                    f"layer-by-layer checkpoint folder {self.folder} was written for another run: its "
                    f"{', '.join(differ)} differ{'s' if len(differ) == 1 else ''} from this one's (model, recipe, "
                    "calibration tokens, seed, replay grouping); delete the folder or choose another to start over")
        elif writer:
            self.folder.mkdir(parents=True, exist_ok=True)
            _atomic(manifest, lambda tmp: tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True)))

    def _path(self, index: int) -> Path:
        return self.folder / f"block-{index:05d}.safetensors"

    def completed(self, n_blocks: int) -> int:
        """How many blocks from the first are saved (resume at this index)."""
        i = 0
        while i < n_blocks and self._path(i).exists():
            i += 1
        return i

    def save(self, index: int, results: Mapping[str, Any], stats: Mapping[str, LayerStats]) -> None:
        """Block ``index``'s ``LayerResult``s and statistics (written by the writer only)."""
        if not self.writer:
            return
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"results": {}, "stats": {}}
        owner_of_scale: dict[int, str] = {}     # linears of one group share one AWQ scale tensor
        for fqn, r in results.items():
            qw = r.qweight
            tensors[f"{fqn}|q"] = qw.q.contiguous()
            tensors[f"{fqn}|scale"] = qw.scale.contiguous()
            if qw.zero is not None:
                tensors[f"{fqn}|zero"] = qw.zero.contiguous()
            scale_of = None
            if r.scale is not None:
                scale_of = owner_of_scale.setdefault(id(r.scale), fqn)
                if scale_of == fqn:
                    tensors[f"{fqn}|awq_scale"] = r.scale.contiguous()
            meta["results"][fqn] = {"dtype": qw.dtype, "group_size": qw.group_size, "reduce_range": qw.reduce_range,
                                    "alpha": r.alpha, "note": r.note, "awq_scale_of": scale_of}
        for fqn, st in stats.items():
            tensors[f"{fqn}|absmax"] = st.absmax.contiguous()
            tensors[f"{fqn}|samples"] = st.samples.contiguous()
            if st.absmean is not None:
                tensors[f"{fqn}|absmean"] = st.absmean.contiguous()
            meta["stats"][fqn] = {"tokens": st.tokens}
        tensors = {k: v.detach().cpu() for k, v in tensors.items()}
        _atomic(self._path(index), lambda tmp: save_file(tensors, str(tmp), metadata={"qcompiler": json.dumps(meta)}))

    def load(self, index: int, result_type: type) -> tuple[dict[str, Any], dict[str, LayerStats]]:
        """Block ``index``'s results (``result_type`` objects) and statistics."""
        from safetensors import safe_open
        path = self._path(index)
        try:
            with safe_open(str(path), "pt") as f:
                meta = json.loads(f.metadata()["qcompiler"])
            t = load_file(str(path))
            results = {fqn: result_type(QuantizedWeight(t[f"{fqn}|q"], t[f"{fqn}|scale"], t.get(f"{fqn}|zero"),
                                                        m["dtype"], m["group_size"], m["reduce_range"]),
                                        t[f"{m['awq_scale_of']}|awq_scale"] if m["awq_scale_of"] else None,
                                        m["alpha"], m["note"])
                       for fqn, m in meta["results"].items()}
            stats = {fqn: LayerStats(t[f"{fqn}|absmax"], t[f"{fqn}|samples"], m["tokens"], t.get(f"{fqn}|absmean"))
                     for fqn, m in meta["stats"].items()}
        except (OSError, KeyError, ValueError, TypeError, SafetensorError) as e:
            raise CalibrationError(f"layer-by-layer checkpoint {path} is unreadable ({type(e).__name__}: {e}); "
                                   "delete it (and the blocks after it) to recompute from there") from None
        return results, stats


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
