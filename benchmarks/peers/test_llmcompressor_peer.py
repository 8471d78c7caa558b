"""Fast checks of the llm-compressor peer driver that need neither the venv nor the model.

Run from the repository root: python -m pytest -q benchmarks/peers/test_llmcompressor_peer.py
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from peers import llmcompressor_peer as peer


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(16, 128)
        self.proj = torch.nn.Linear(128, 96, bias=False)
        self.head = torch.nn.Linear(128, 16, bias=False)
        self.head.weight = self.emb.weight   # tied, counted once


def _meta(model: torch.nn.Module, **extra) -> dict:
    oneshot = peer._oneshot_module()
    return {"tool": "llm-compressor", "method": "gptq", "version": peer.LLMCOMPRESSOR_VERSION,
            "compressed_tensors_version": peer.COMPRESSED_TENSORS_VERSION, "group_size": 64, "symmetric": True,
            "calibration_sha256": "abc", "ignored": ["lm_head"], "fp32_weights_sha256": oneshot.weights_sha256(model),
            **extra}


def test_cache_match_requires_same_versions_scheme_and_calibration():
    meta = _meta(_Tiny())
    assert peer._matches(meta, "gptq", "abc", 64, ["lm_head"])
    assert not peer._matches(meta, "awq", "abc", 64, ["lm_head"])
    assert not peer._matches(meta, "gptq", "other", 64, ["lm_head"])
    assert not peer._matches({**meta, "version": "0.13.0"}, "gptq", "abc", 64, ["lm_head"])
    assert not peer._matches({**meta, "symmetric": False}, "gptq", "abc", 64, ["lm_head"])
    assert not peer._matches(meta, "gptq", "abc", 128, ["lm_head"])


def test_weights_hash_sees_a_one_ulp_change():
    model, oneshot = _Tiny(), peer._oneshot_module()
    before = oneshot.weights_sha256(model)
    with torch.no_grad():
        model.proj.weight[0, 0] = torch.nextafter(model.proj.weight[0, 0], torch.tensor(1.0))
    assert oneshot.weights_sha256(model) != before


def test_load_peer_weights_copies_tensors_and_leaves_the_model_alone(tmp_path):
    model = _Tiny()
    new = torch.randn(96, 128)
    save_file({"proj.weight": new}, str(tmp_path / "weights.safetensors"))
    loaded = peer.load_peer_weights(model, tmp_path, _meta(model))
    assert torch.equal(loaded.proj.weight, new)
    assert not torch.equal(model.proj.weight, new)
    assert torch.equal(loaded.emb.weight, model.emb.weight)


def test_load_peer_weights_refuses_other_fp32_weights_or_unknown_tensors(tmp_path):
    model = _Tiny()
    save_file({"proj.weight": torch.zeros(96, 128)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(RuntimeError, match="different FP32 weights"):
        peer.load_peer_weights(model, tmp_path, {**_meta(model), "fp32_weights_sha256": "0" * 64})
    save_file({"nope.weight": torch.zeros(96, 128)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(RuntimeError, match="nope.weight"):
        peer.load_peer_weights(model, tmp_path, _meta(model))


def test_w4_weight_mb_counts_packed_int4_and_fp32_group_scales():
    model = _Tiny()
    fp32 = (16 * 128 + 96 * 128) * 4            # tied embedding/head once, proj
    w4 = 96 * 64 + 96 * 2 * 4                   # 128 int4 per row in 64 bytes; 2 groups of 64
    assert peer._w4_weight_mb(model, ["proj"], 64) == pytest.approx((fp32 - 96 * 128 * 4 + w4) / 1e6)


def test_run_oneshot_reuses_a_matching_result_without_the_venv(tmp_path):
    model, oneshot = _Tiny(), peer._oneshot_module()
    calib = torch.arange(8, dtype=torch.int64).view(2, 4)
    result = tmp_path / "gptq"
    result.mkdir()
    (result / "weights.safetensors").write_bytes(b"")
    meta = _meta(model, calibration_sha256=oneshot.tensor_sha256(calib), oneshot_seconds=1.0)
    (result / "meta.json").write_text(json.dumps(meta))
    got_dir, got = peer.run_oneshot("gptq", calib, tmp_path, venv=tmp_path / "no-venv")
    assert got_dir == result
    assert got.pop("reused_from_cache").endswith(" UTC")     # the reuse is stated in the row's note
    assert got == meta
    with pytest.raises(ValueError, match="method"):
        peer.run_oneshot("rtn", calib, tmp_path)


def test_progress_names_the_last_layer_and_stage_the_log_reached(tmp_path):
    log_path = tmp_path / "oneshot.log"
    log_path.write_text("loading\n")
    assert peer._progress(log_path) == "before the first layer"
    log_path.write_text("(1/31): Calibrating: 100%|##| 4/4\r(1/31): Propagating: 50%\r(2/31): Calibrating:  3%")
    assert peer._progress(log_path) == "(2/31): Calibrating"
