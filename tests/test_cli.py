"""The command line: ``recipes``, ``--help``, refusals, and with the shared stories260K model a
quantize -> save -> eval round trip and the FP32-vs-preset table."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from qcompiler import recipes
from qcompiler.cli import main
from qcompiler.models import shared_dir
from qcompiler.recipes import Recipe

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
    listed = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert listed == recipes.names()
    assert "weight-only" in out and "SmoothQuant" in out


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
