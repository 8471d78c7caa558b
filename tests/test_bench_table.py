"""The benchmark table's layout: speed columns only when prefill speed was measured; the header names
the CPU and its int8 kernels, each row the GEMM kernels it ran."""

from __future__ import annotations

import pytest

from qcompiler.tools.bench import PROTOCOLS, Row, format_table


def _facts(prefill: bool) -> dict:
    return {"protocol": PROTOCOLS["stories260K"], "model": "stories260K", "eval_windows": 4, "threads": 2,
            "torch": "x", "load_start": 0.5, "load_end": 0.7, "prefill": prefill,
            "machine": "Some CPU (x86_64; avx2)", "machine_class": "avx2",
            "kernel_line": "int8 GEMM kernels at 512x576x1536 against an fp32 matmul (4.00 ms): onednn-u8s8 1.53x "
                           "(int16-pairs), int_mm 0.03x (exact)"}


@pytest.mark.parametrize("prefill", [True, False])
def test_speed_columns_follow_whether_prefill_was_timed(prefill):
    rows = [Row("FP32", 10.0, prefill_tok_s=1000.0),
            Row("w4a16-rtn", 11.0, 10.0, 0.0, 1.5, 2.0, 1500.0, 1.5, 3, [], 3, "dequant [fp32] x3", (1.25, 1.75))]
    text = format_table(rows, _facts(prefill))
    table = [line for line in text.splitlines() if line.startswith("|")]
    cells = [len(line.strip("|").split("|")) for line in table]
    assert cells == [10 if prefill else 8] * len(table)
    assert ("prefill tok/s" in table[0]) is prefill
    assert ("1500 | 1.50x [1.25, 1.75] |" in table[-1]) is prefill
    assert ("prefill speed not measured" in text) is not prefill
    assert "| w4a16-rtn | 11.000 | +10.00 |" in table[-1] and table[-1].endswith("| dequant [fp32] x3 |")
    assert "CPU: Some CPU (x86_64; avx2) (class `avx2`)" in text and "onednn-u8s8 1.53x (int16-pairs)" in text


def test_onednn_gemm_row_runs_every_float_linear_on_onednn():
    """The `FP32 (oneDNN GEMM, eager)` reference row: the float model's linears swapped for
    ``qcompiler::onednn_linear``, the float model's outputs within float32 summation."""
    import torch

    from qcompiler.backends.gemm_kernels import onednn_float_available
    from qcompiler.tools.bench import _onednn_gemm_backend
    from tiny_models import tiny_model, token_batches
    if onednn_float_available(torch.device("cpu")):
        pytest.skip(onednn_float_available(torch.device("cpu")))
    model = tiny_model("llama")
    graphs = []

    def backend(gm, example_inputs):
        out = _onednn_gemm_backend(gm, example_inputs)
        graphs.append(out)
        return out

    x = token_batches(1, 9, seed=3)[0]
    torch._dynamo.reset()
    with torch.no_grad():
        ref = model(x).logits
        out = torch.compile(model, backend=backend)(x).logits
    targets = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert targets.count(torch.ops.qcompiler.onednn_linear) == linears
    assert torch.nn.functional.linear not in targets and torch._C._nn.linear not in targets
    assert float((out - ref).norm() / ref.norm()) <= 1e-5
    torch._dynamo.reset()


def test_fallback_notes_group_linears_kept_for_one_reason():
    from qcompiler.tools.bench import _fallback_note
    kept = [f"model.layers.{i}.mlp.up_proj (op kind 'linear' is in fallback.keep_op_kinds)" for i in range(30)]
    note = _fallback_note(kept + ["model.layers.3.self_attn.o_proj (output SQNR 12.0 dB < 20.0)"])
    assert note.startswith("30 linears (op kind 'linear' is in fallback.keep_op_kinds; model.layers.0.mlp.up_proj, ")
    assert "model.layers.29.mlp.up_proj)" in note and "layers.17" not in note
    assert note.endswith("; model.layers.3.self_attn.o_proj (output SQNR 12.0 dB < 20.0)")


def test_a_rotation_recipe_row_quantizes_a_rotated_copy_and_leaves_the_model_as_it_was():
    """A backend sees the model after Dynamo captured it, too late to rotate it: the table rotates a copy."""
    import copy

    import torch

    import qcompiler
    from qcompiler.tools import data, evaluate, models
    from qcompiler.tools.bench import Protocol, _text, run_table
    if models.shared_dir() is None:
        pytest.skip("needs ../shared (stories260K and its texts)")
    protocol = Protocol("tinystories-eval", 2048, 256, True, "tinystories-calib", calib_samples=8, calib_seq=128)
    rows, _ = run_table("stories260K", ["w8a16+rot"], protocol, progress=False, prefill=False)
    assert rows[0].name == "FP32" and rows[-1].name == "w8a16+rot"
    model, tok = models.load_model("stories260K")
    windows = data.eval_windows(data.tokenize_text(tok, _text(protocol.eval_text)), 2048, 256, bos_id=tok.bos_token_id)
    assert rows[0].ppl == evaluate.perplexity(model, windows, progress=False)      # FP32 after the row: unrotated
    calib = data.calibration_batches(data.tokenize_text(tok, _text(protocol.calib_text)), 8, 128, seed=0,
                                     bos_id=tok.bos_token_id)
    eager = qcompiler.quantize(copy.deepcopy(model), "w8a16+rot", calib, progress=False)
    assert qcompiler.report(eager).rotation
    torch._dynamo.reset()
    assert rows[-1].ppl == pytest.approx(evaluate.perplexity(eager, windows, progress=False), rel=1e-4)
