"""``qcompiler export-onnx``: help, refusals before any work, and (with ../shared) an export of
stories260K with 7-bit weights (``--reduce-range``) that passes TensorRT's rules and runs in onnxruntime."""

from __future__ import annotations

import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from qcompiler.tools.cli import main  # noqa: E402
from qcompiler.tools.models import shared_dir  # noqa: E402

needs_shared = pytest.mark.skipif(shared_dir() is None, reason="../shared (models and text) not found; CI provides it")


def test_help_describes_the_export(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export-onnx", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for word in ("TensorRT", "--recipe", "--out", "--opset", "--calib-samples", "--attention-mask", "--reduce-range"):
        assert word in out


@pytest.mark.parametrize("recipe,match", [("w8a8-int8-sq-dynamic", "dynamic per-token"),
                                          ("w8a16", "weight-only quantization is INT4 only"),
                                          ("fp8 --reduce-range", "reduce_range=True is only valid with dtype 'int8'")])
def test_unexportable_recipe_returns_2_without_loading_a_model(tmp_path, capsys, recipe, match):
    out = tmp_path / "m.onnx"
    assert main(["export-onnx", "--model", str(tmp_path / "no-such-model"), "--recipe", *recipe.split(),
                 "--out", str(out)]) == 2
    assert match in capsys.readouterr().err
    assert not out.exists()


@needs_shared
def test_export_stories260k(tmp_path, capsys):
    from qcompiler.export import check_tensorrt, onnxruntime_session
    import numpy as np
    out = tmp_path / "stories.onnx"
    assert main(["export-onnx", "--model", "stories260K", "--recipe", "w8a8-int8-sq", "--out", str(out),
                 "--calib-samples", "4", "--calib-seq", "64", "--attention-mask", "--reduce-range", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "note: INT8 weights are 7-bit ([-64, 63], weight.reduce_range)" in printed
    summary = check_tensorrt(out)
    assert summary.gemms.get("INT8/INT8", 0) > 0
    import onnx
    weights = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    assert len(weights) == summary.gemms["INT8/INT8"] and all(-64 <= w.min() and w.max() <= 63 for w in weights)
    sess = onnxruntime_session(out)
    ids = np.arange(1, 13, dtype=np.int64).reshape(2, 6)
    logits = sess.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]
    assert logits.shape[:2] == (2, 6) and np.isfinite(logits).all()
