"""The command line: ``recipes``, ``--help``, refusals (each one ``qcompiler: error:`` line, status 2),
quantizing a tiny model with and without calibration, and with the shared stories260K model a
quantize -> save -> eval round trip and the FP32-vs-preset table."""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import safetensors.torch
import torch

import qcompiler
import qcompiler.passes
from qcompiler import recipes
from qcompiler.tools import models
from qcompiler.tools.cli import main
from qcompiler.tools.models import shared_dir
from qcompiler.recipes import Recipe
from qcompiler.runtime.serialization import WEIGHTS_FILE, save_quantized
from tiny_models import VOCAB, tiny_model

needs_shared = pytest.mark.skipif(shared_dir() is None, reason="../shared (models and text) not found; CI provides it")

_PPL = re.compile(r"perplexity (\d+(?:\.\d+)?)")


def _ppl(text: str) -> float:
    found = _PPL.findall(text)
    assert len(found) == 1, text
    return float(found[0])


# -- recipes -----------------------------------------------------------------------------------
def test_recipes_lists_every_preset(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    table, _, footer = out.partition("\n\n")
    listed = [line.split()[0] for line in table.splitlines() if line.strip()]
    assert listed == recipes.names()
    assert "weight-only" in out and "SmoothQuant" in out and "BASE+rot-online" in footer
    assert [line.split()[2] for line in table.splitlines() if line.startswith("kv-")] == ["float"] * 6
    free = {line.split()[0] for line in out.splitlines() if line.endswith(", runs without calibration")}
    assert free == {n for n in recipes.names() if not recipes.get(n).requires_calibration} >= {"fp8-dynamic", "w8a16"}


@pytest.mark.parametrize("name", recipes.names())
def test_recipes_name_prints_its_json(name, capsys):
    assert main(["recipes", name]) == 0
    out = capsys.readouterr().out
    assert Recipe.from_json(out) == recipes.get(name)
    assert json.loads(out)["data"]["name"] == name


def test_recipes_unknown_name(capsys):
    assert main(["recipes", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown recipe 'nope'" in err


# -- refusals and help ---------------------------------------------------------------------------
def test_run_unknown_recipe_returns_2_with_known_names(capsys):
    assert main(["run", "--recipes", "nope"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "unknown recipe 'nope'" in captured.err
    for name in recipes.names():
        assert name in captured.err


def test_run_one_bad_recipe_among_good_ones(capsys):
    assert main(["run", "--recipes", "w8a16,nope"]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err


def test_eval_unknown_model_returns_2(capsys, tmp_path):
    assert main(["eval", str(tmp_path / "nothing-here"), "-q"]) == 2
    assert "unknown name" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["quantize", "--help"], ["eval", "--help"],
                                  ["recipes", "--help"]], ids=lambda a: "-".join(a))
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: qcompiler")
    if argv[0] == "quantize":
        assert "--recipe" in out and "--out" in out


def test_quantize_requires_recipe_and_out(capsys):
    with pytest.raises(SystemExit) as info:
        main(["quantize", "--model", "stories260K"])
    assert info.value.code == 2
    assert "--recipe" in capsys.readouterr().err


# -- bad input ends in one line ------------------------------------------------------------------
def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qcompiler: error: "), err
    assert "Traceback" not in err
    return lines[0]


class _CharTokenizer:
    """Characters as token ids: enough for the CLI's calibration path on a tiny model."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % VOCAB for c in text]}

    def save_pretrained(self, path):
        pass


@pytest.fixture
def tiny_cli(monkeypatch, tmp_path):
    """``--model`` loads a tiny random Llama; returns a calibration text file for ``--calib-text``."""
    loaded = []

    def load_model(name, **kw):
        loaded.append(name)
        return tiny_model("llama"), _CharTokenizer()

    monkeypatch.setattr(models, "load_model", load_model)
    text = tmp_path / "calib.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    return text, loaded


def _quantize_argv(text, out, *extra) -> list[str]:
    return ["quantize", "--model", "tiny", "--calib-text", str(text), "--out", str(out), "-q", *extra]


def test_fp8_dynamic_with_too_little_calibration_says_rows_and_no_calibration(tiny_cli, tmp_path, capsys):
    text, _ = tiny_cli
    argv = _quantize_argv(text, tmp_path / "q", "--recipe", "fp8-dynamic", "--calib-samples", "1", "--calib-seq", "16")
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "GPTQ needs at least 128 calibration rows (tokens) per linear, got 16" in line
    assert "run without calibration data" in line and "--no-calibration" in line
    assert not (tmp_path / "q").exists()


def test_block_checkpoints_resume_to_the_same_checkpoint(tiny_cli, tmp_path):
    """``--block-checkpoints DIR``: one file per decoder block; the same command again reads them all
    (no block recomputed) and writes the same weights."""
    from safetensors.torch import load_file
    from qcompiler.calibration.layerwise import LayerwiseCalibration
    from qcompiler.runtime.serialization import WEIGHTS_FILE
    text, _ = tiny_cli
    argv = ["--recipe", "w4a16-gptq", "--calib-samples", "2", "--calib-seq", "128",
            "--block-checkpoints", str(tmp_path / "blocks")]
    assert main(_quantize_argv(text, tmp_path / "a", *argv)) == 0
    assert len(list((tmp_path / "blocks").glob("block-*.safetensors"))) == 2
    observed = []
    real = LayerwiseCalibration._observe
    try:
        LayerwiseCalibration._observe = lambda self, block, prefix, *a, **k: observed.append(prefix) or \
            real(self, block, prefix, *a, **k)
        assert main(_quantize_argv(text, tmp_path / "b", *argv)) == 0
    finally:
        LayerwiseCalibration._observe = real
    assert observed == []
    a, b = load_file(tmp_path / "a" / WEIGHTS_FILE), load_file(tmp_path / "b" / WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_block_checkpoints_refused_for_a_one_pass_recipe(tiny_cli, tmp_path, capsys):
    text, _ = tiny_cli
    argv = _quantize_argv(text, tmp_path / "q", "--recipe", "w8a8-int8-sq", "--block-checkpoints", str(tmp_path / "b"))
    assert main(argv) == 2
    assert "calibrates in one pass, not layer by layer" in _one_error_line(capsys)


def test_offload_dir_maps_the_blocks_and_writes_the_same_checkpoint(tiny_cli, tmp_path, capsys):
    """``--offload-dir DIR``: one memory-mapped file per decoder block; the checkpoint is the one the same
    command writes without it."""
    from safetensors.torch import load_file
    from qcompiler.runtime.serialization import WEIGHTS_FILE
    text, _ = tiny_cli
    argv = ["--recipe", "w4a16-gptq", "--calib-samples", "2", "--calib-seq", "128"]
    assert main(_quantize_argv(text, tmp_path / "a", *argv)) == 0
    assert main(_quantize_argv(text, tmp_path / "b", *argv, "--offload-dir", str(tmp_path / "off"))) == 0
    assert "offloaded 2 decoder blocks" in capsys.readouterr().out
    assert len(list((tmp_path / "off").glob("block-*.safetensors"))) == 2
    a, b = load_file(tmp_path / "a" / WEIGHTS_FILE), load_file(tmp_path / "b" / WEIGHTS_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flag,value", [("--offload-dir", "off"), ("--calibration-device", "cpu")])
def test_block_at_a_time_flags_refused_for_a_one_pass_recipe(tiny_cli, tmp_path, capsys, flag, value):
    text, _ = tiny_cli
    argv = _quantize_argv(text, tmp_path / "q", "--recipe", "w8a8-int8-sq", flag, value)
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert flag in line and "calibrates in one pass, not layer by layer" in line


def test_an_unknown_calibration_device_is_one_error_line(tiny_cli, tmp_path, capsys):
    text, _ = tiny_cli
    argv = _quantize_argv(text, tmp_path / "q", "--recipe", "w4a16-gptq", "--calibration-device", "nodevice:3")
    assert main(argv) == 2
    assert "--calibration-device nodevice:3" in _one_error_line(capsys)
    assert not (tmp_path / "q").exists()


def test_fp8_dynamic_with_one_calibration_sample_runs_gptq(tiny_cli, tmp_path, capsys):
    """--calib-samples 1 is one sequence of --calib-seq (512) tokens: GPTQ's 128 rows are there."""
    text, _ = tiny_cli
    assert main(_quantize_argv(text, tmp_path / "q", "--recipe", "fp8-dynamic", "--calib-samples", "1")) == 0
    rep = json.loads((tmp_path / "q" / "report.json").read_text())
    notes = [d["note"] for d in rep["layers"].values() if d["quantize"]]
    assert notes and all("gptq" in n for n in notes)
    assert not any("GPTQ" in w for w in rep["warnings"])


def test_fp8_dynamic_without_calibration(tiny_cli, tmp_path, capsys):
    text, _ = tiny_cli
    with pytest.warns(UserWarning, match="GPTQ .* was skipped"):
        assert main(_quantize_argv(text, tmp_path / "q", "--recipe", "fp8-dynamic", "--no-calibration")) == 0
    rep = json.loads((tmp_path / "q" / "report.json").read_text())
    assert any("GPTQ (gptq.optional=True) was skipped" in w for w in rep["warnings"])
    assert sum(d["quantize"] for d in rep["layers"].values()) == 14
    assert (tmp_path / "q" / WEIGHTS_FILE).is_file()


def test_no_calibration_refused_for_a_recipe_that_needs_it(tiny_cli, tmp_path, capsys):
    text, loaded = tiny_cli
    assert main(_quantize_argv(text, tmp_path / "q", "--recipe", "w4a16-gptq", "--no-calibration")) == 2
    assert "--no-calibration: recipe 'w4a16-gptq' needs calibration data for GPTQ" in _one_error_line(capsys)
    assert loaded == []          # refused before loading the model


def test_recipe_json_with_a_string_for_a_bool(tmp_path, capsys):
    d = recipes.get("w8a16").to_dict()
    d["data"]["weight"]["symmetric"] = "false"
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(d))
    assert main(["quantize", "--recipe", str(path), "--out", str(tmp_path / "q")]) == 2
    assert 'recipe.weight.symmetric="false" must be a bool' in _one_error_line(capsys)


class _Fails:
    name = "user_fails"
    requires = ("annotate",)

    def run(self, gm, ctx):
        raise RuntimeError("user pass broke")


def test_pass_error_inside_torch_compile_is_one_line(tiny_cli, tmp_path, capsys, monkeypatch):
    """quantize() captures the graph with torch.compile, which wraps the PassError in its own error."""
    text, _ = tiny_cli
    planning = qcompiler.passes.planning_passes
    monkeypatch.setattr(qcompiler.passes, "planning_passes", lambda: planning() + [_Fails()])
    assert main(_quantize_argv(text, tmp_path / "q", "--recipe", "w4a16-rtn")) == 2
    line = _one_error_line(capsys)
    assert "pass 'user_fails' failed" in line and "RuntimeError: user pass broke" in line


def test_unsupported_error_is_one_line(tmp_path, capsys):
    assert main(["export-onnx", "--recipe", "fp8-dynamic", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "recipe 'fp8-dynamic' has dynamic per-token activations" in _one_error_line(capsys)


def test_a_bug_keeps_its_traceback(monkeypatch, tmp_path):
    def broken(name, **kw):
        raise RuntimeError("a bug, not bad input")
    monkeypatch.setattr(models, "load_model", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        main(["quantize", "--model", "tiny", "--recipe", "w4a16-rtn", "--out", str(tmp_path / "q")])


def test_a_failed_collective_prints_its_line_and_leaves_at_once(monkeypatch, tmp_path, capsys):
    """After a peer rank died the process must not run the interpreter's teardown (gloo can abort in it,
    NCCL hang): the error line is printed, then ``os._exit(2)``."""
    from qcompiler.calibration.distributed import DistributedCalibrationError
    from qcompiler.tools import cli

    def peer_died(name, **kw):
        raise DistributedCalibrationError("rank 0 of 2: all_reduce at block model.layers.1 failed (peer gone)")
    exits = []
    monkeypatch.setattr(models, "load_model", peer_died)
    monkeypatch.setattr(cli.os, "_exit", lambda code: exits.append(code))
    assert main(["quantize", "--model", "tiny", "--recipe", "w4a16-rtn", "--out", str(tmp_path / "q")]) == 2
    assert exits == [2] and "block model.layers.1" in _one_error_line(capsys)


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    recipe = Recipe(name="w8", weight=recipes.WeightSpec())
    model = tiny_model("llama")
    qcompiler.quantize(model, recipe, progress=False)
    out = tmp_path_factory.mktemp("eval") / "q"
    save_quantized(model, out, recipe)
    return out


def _without(folder, key: str = "", tensor: str = ""):
    weights = folder / WEIGHTS_FILE
    t = safetensors.torch.load_file(str(weights))
    with safetensors.safe_open(str(weights), framework="pt") as f:
        meta = dict(f.metadata())
    safetensors.torch.save_file({k: v for k, v in t.items() if k != tensor}, str(weights),
                                metadata={k: v for k, v in meta.items() if k != key})


LAYER = "model.layers.0.mlp.up_proj"
BROKEN_FOLDERS = [
    ("corrupt-file", lambda d: (d / WEIGHTS_FILE).write_bytes(b"\x07garbage" * 20), "is not a readable safetensors file"),
    ("foreign-safetensors", lambda d: safetensors.torch.save_file({"w": torch.zeros(2)}, str(d / WEIGHTS_FILE)),
     "is not a qcompiler file"),
    ("metadata-lacks-layers", lambda d: _without(d, key="layers"), "metadata lacks ['layers']"),
    ("layer-lacks-tensor", lambda d: _without(d, tensor=f"{LAYER}.w_q"), f"layer '{LAYER}' lacks tensors ['{LAYER}.w_q']"),
    ("no-config", lambda d: (d / "config.json").unlink(), "config.json not found"),
    ("no-weights", lambda d: (d / WEIGHTS_FILE).unlink(), f"{WEIGHTS_FILE} not found"),
]


@pytest.mark.parametrize("break_it,expected", [(b, e) for _, b, e in BROKEN_FOLDERS], ids=[i for i, _, _ in BROKEN_FOLDERS])
def test_eval_broken_checkpoint_is_one_line(break_it, expected, saved_tiny, tmp_path, capsys):
    folder = tmp_path / "q"
    shutil.copytree(saved_tiny, folder)
    break_it(folder)
    assert main(["eval", str(folder), "-q"]) == 2
    line = _one_error_line(capsys)
    assert expected in line and str(folder) in line


def test_eval_corrupt_weights_in_a_plain_folder_is_one_line(tmp_path, capsys):
    (tmp_path / WEIGHTS_FILE).write_bytes(b"\x00" * 3)
    assert main(["eval", str(tmp_path), "-q"]) == 2
    assert f"{tmp_path / WEIGHTS_FILE} is not a readable safetensors file" in _one_error_line(capsys)


def test_eval_float_hugging_face_folder_is_evaluated_as_float(tiny_cli, tmp_path, capsys):
    """Its model.safetensors (format 'pt') is no qcompiler file, and no recipe.json is beside it:
    the float model is loaded, not refused."""
    text, loaded = tiny_cli
    folder = tmp_path / "hf"
    tiny_model("llama").save_pretrained(str(folder))
    argv = ["eval", str(folder), "--eval-text", str(text), "--eval-tokens", "256", "--context", "64", "-q"]
    assert main(argv) == 0
    assert loaded == [str(folder)] and "(float): perplexity" in capsys.readouterr().out


# -- with the shared model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_thread():
    """stories260K's ops are small enough that a second intra-op thread buys nothing, and on a
    busy 2-core machine OpenMP's spin-waits make the SmoothQuant alpha search ~10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def quantized_dir(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("cli") / "q"
    rc = main(["quantize", "--model", "stories260K", "--recipe", "w8a8-int8-sq-dynamic", "--out", str(out),
               "--calib-samples", "8", "-q"])
    assert rc == 0
    return out


@needs_shared
def test_quantize_writes_a_loadable_folder(quantized_dir):
    for name in ("model.safetensors", "recipe.json", "report.json", "config.json"):
        assert (quantized_dir / name).is_file(), name
    assert Recipe.from_json((quantized_dir / "recipe.json").read_text()) == recipes.get("w8a8-int8-sq-dynamic")
    rep = json.loads((quantized_dir / "report.json").read_text())
    assert rep["recipe"] == "w8a8-int8-sq-dynamic"
    assert sum(d["quantize"] for d in rep["layers"].values()) > 0


@needs_shared
def test_eval_quantized_close_to_float(quantized_dir, capsys, one_thread):
    capsys.readouterr()
    assert main(["eval", str(quantized_dir), "--eval-tokens", "2048", "-q"]) == 0
    out_q = capsys.readouterr().out
    assert "w8a8-int8-sq-dynamic" in out_q
    assert main(["eval", "stories260K", "--eval-tokens", "2048", "-q"]) == 0
    out_fp = capsys.readouterr().out
    assert "(float)" in out_fp
    q, fp = _ppl(out_q), _ppl(out_fp)
    assert math.isfinite(q) and math.isfinite(fp) and fp > 1.0
    assert abs(q / fp - 1.0) < 0.05, (q, fp)


@needs_shared
def test_run_prints_table(capsys, one_thread):
    rc = main(["run", "--model", "stories260K", "--recipes", "w8a16", "--eval-tokens", "2048", "--calib-samples", "4",
               "--no-prefill", "-q"])
    assert rc == 0
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "FP32" in rows and "w8a16" in rows
    fp, q = (float(rows[n].split("|")[2]) for n in ("FP32", "w8a16"))
    assert math.isfinite(fp) and math.isfinite(q) and abs(q / fp - 1.0) < 0.05
