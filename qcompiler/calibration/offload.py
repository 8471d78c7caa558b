"""Decoder blocks kept on disk: their float weights memory-mapped from safetensors files.

``offload_blocks(model, folder)`` writes each decoder block's parameters and buffers to
``folder/block-NNNNN.safetensors`` and puts memory-mapped tensors in their place: file-backed
pages that the operating system reads on first use and may drop again under memory pressure,
so the float model no longer needs its size in RAM. The mapping is private: writing to such a
tensor copies the page into process memory and never changes the file.

Layer-by-layer calibration (``LayerwiseCalibration``) never writes into a block's weights: it
puts each linear's dequantized weight in place by assignment and puts the original tensor back
at the end, so an offloaded block stays on disk through calibration and only the block being
worked on (its weights, Hessians and dequantized copies) is in memory at once, beside the
captured activations and the quantized results (a quarter of the float weights for INT4 codes
held as bytes). With ``LayerwiseCalibration(execution_device=...)`` that block is also the only
one on the accelerator. ``LayerwiseCalibration(samples_dir=...)`` (the CLI's ``--offload-dir`` sets it) writes
each block's sampled input rows (``samples_per_layer`` x K float32 per linear, kept for the graph passes after
calibration) to ``samples-NNNNN.safetensors`` there and maps them the same way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qcompiler.errors import CalibrationError

__all__ = ["OffloadedBlocks", "offload_blocks", "release_free_memory", "write_mapped"]

_MANIFEST = "offload.json"


@dataclass(frozen=True)
class OffloadedBlocks:
    """What ``offload_blocks`` put on disk."""

    folder: Path
    blocks_path: str        # module path of the decoder blocks' ModuleList
    files: tuple[Path, ...]
    nbytes: int             # bytes of tensors now memory-mapped instead of held in memory


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None on another C library."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the operating system (glibc ``malloc_trim(0)``): tensors freed
    between long-lived small allocations otherwise stay counted in the process's resident memory. Returns
    whether anything could be asked (False on a C library without ``malloc_trim``)."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


def _block_tensors(block: torch.nn.Module, where: str) -> dict[str, torch.Tensor]:
    """The block's parameters and buffers by local name, each shared tensor once (under its first name)."""
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for name, t in list(block.named_parameters(remove_duplicate=False)) + \
            list(block.named_buffers(remove_duplicate=False)):
        if t is None:
            continue
        if t.device.type != "cpu":
            raise CalibrationError(f"offload_blocks: {where}.{name} is on {t.device}; disk offload maps tensors "
                                   "into CPU memory: keep the model on the CPU (LayerwiseCalibration's "
                                   "execution_device moves one block at a time to the accelerator)")
        if id(t) in seen:
            continue
        seen[id(t)] = name
        out[name] = t
    return out


def _shared_outside(model: torch.nn.Module, block: torch.nn.Module, where: str) -> None:
    inside = {id(t) for t in list(block.parameters()) + list(block.buffers())}
    block_ids = {id(m) for m in block.modules()}
    for mod_name, m in model.named_modules():
        if id(m) in block_ids:
            continue
        for name, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None and id(t) in inside:
                raise CalibrationError(f"offload_blocks: {mod_name}.{name} is the same tensor as a weight of {where}: "
                                       "a block whose weights are shared outside it cannot go to disk")


def _set(block: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = block.get_submodule(owner_name) if owner_name else block
    (owner._parameters if leaf in owner._parameters else owner._buffers)[leaf] = tensor


def write_mapped(path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write ``tensors`` (CPU) to the safetensors file ``path`` (atomically: temporary file, then rename) and
    return them memory-mapped from it, by name: the same bits, in file-backed pages."""
    tmp = path.with_suffix(".safetensors.tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp))
    os.replace(tmp, path)
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def offload_blocks(model: torch.nn.Module, folder: str | os.PathLike) -> OffloadedBlocks:
    """Move every decoder block's parameters and buffers to memory-mapped safetensors under ``folder``.

    The model computes the same (the mapped tensors hold the same bits). The files stay in use as
    long as the model does: do not delete ``folder`` before the model. Writing a block is atomic
    (temporary file, then rename), and a block already mapped is written again (the folder holds the
    model's current weights)."""
    from qcompiler.calibration.layerwise import find_decoder_blocks
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    blocks_path, blocks = find_decoder_blocks(model)
    files, total = [], 0
    for i, block in enumerate(blocks):
        where = f"{blocks_path}.{i}"
        _shared_outside(model, block, where)
        tensors = _block_tensors(block, where)
        path = folder / f"block-{i:05d}.safetensors"
        mapped = write_mapped(path, tensors)
        # every name of a shared tensor gets the one new tensor: sharing inside the block survives
        new: dict[int, torch.Tensor] = {}
        for k, t in tensors.items():
            new[id(t)] = torch.nn.Parameter(mapped[k], requires_grad=t.requires_grad) \
                if isinstance(t, torch.nn.Parameter) else mapped[k]
        for name, t in list(block.named_parameters(remove_duplicate=False)) + \
                list(block.named_buffers(remove_duplicate=False)):
            if t is not None:
                _set(block, name, new[id(t)])
        files.append(path)
        total += sum(t.numel() * t.element_size() for t in mapped.values())
    (folder / _MANIFEST).write_text(json.dumps({"blocks_path": blocks_path, "blocks": len(files)}) + "\n")
    release_free_memory()     # the in-memory copies just freed
    return OffloadedBlocks(folder, blocks_path, tuple(files), total)
