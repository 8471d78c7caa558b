"""One import direction between the library's layers, checked on the source (AST, no imports run).

Layers, lowest first, each a subpackage of ``qcompiler``: primitives (``errors``, ``recipes``, ``core``:
numerics, packing, layer_quant, the op schemas, their reference kernels, the format table) <- ``algorithms``
(GPTQ, AWQ, their registry) <- ``calibration`` <- pipeline (``pipeline``: pass contract, context, report;
``targets``) <- passes <- API. Backends may use only the primitives; ``runtime`` (eager modules,
checkpoints) and the export machinery (Q/DQ form, ONNX ops, TensorRT rules) sit beside them, under the
API; ``export_onnx`` (``qcompiler.export`` and its ``exporter``), which quantizes through the API and then
exports, is an entry point at the API's level; ``tools`` (bench, models, data, evaluate,
texts, CLI) sits on top and nothing in the library imports it. Lazy (function-level) imports count too.

``KNOWN`` lists today's exceptions, each to be removed by the slice that fixes it (architecture v2,
issue 17); the test fails on a new one and on a listed one that no longer exists, so the list only
shrinks.
"""

from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"qcompiler": "qcompiler", "passes": "qcompiler.passes", "backends": "qcompiler.backends"}

#: layer -> module patterns (first match wins)
LAYERS = {
    "tooling": ["qcompiler.tools", "qcompiler.tools.*", "qcompiler.__main__"],
    "primitives": ["qcompiler.errors", "qcompiler.core", "qcompiler.core.*", "qcompiler.recipes", "qcompiler.recipes.*"],
    "algorithms": ["qcompiler.algorithms", "qcompiler.algorithms.*"],
    "calibration": ["qcompiler.calibration", "qcompiler.calibration.*"],
    "pipeline": ["qcompiler.pipeline", "qcompiler.targets"],
    "passes": ["qcompiler.passes", "qcompiler.passes.*"],
    "backends": ["qcompiler.backends", "qcompiler.backends.*"],
    # export_onnx(model, recipe, ...) quantizes through the API, then exports: an entry point like
    # qcompiler.quantize (the package and its exporter module); the export machinery sits beside runtime
    "api": ["qcompiler.api", "qcompiler", "qcompiler.rotation", "qcompiler.sparsity", "qcompiler.qat", "qcompiler.export",
            "qcompiler.export.exporter"],
    "runtime": ["qcompiler.runtime", "qcompiler.runtime.*", "qcompiler.export.*"],
}
#: what each layer may import besides itself
ALLOWED = {
    "primitives": set(),
    "algorithms": {"primitives"},
    "calibration": {"primitives", "algorithms"},
    "pipeline": {"primitives", "algorithms", "calibration"},
    "passes": {"primitives", "algorithms", "calibration", "pipeline"},
    "backends": {"primitives"},
    "runtime": {"primitives", "algorithms", "calibration", "pipeline", "passes", "backends"},
    "api": {"primitives", "algorithms", "calibration", "pipeline", "passes", "backends", "runtime"},
    "tooling": {"primitives", "algorithms", "calibration", "pipeline", "passes", "backends", "runtime", "api"},
}
#: (importer, imported): today's exceptions (none left)
KNOWN: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, package in SOURCES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            mods[".".join([package, *parts])] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The library modules ``name`` imports (``from pkg import sub`` counts as importing ``pkg.sub``
    when that is a module, else ``pkg``)."""
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in mods}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            subs = {f"{module}.{a.name}" for a in node.names} & set(mods)
            out |= subs or ({module} if module in mods else set())
            if subs and len(subs) < len(node.names) and module in mods:
                out.add(module)     # names imported from the package itself besides submodules
    out.discard(name)
    return out


def _layer(module: str) -> str:
    for layer, patterns in LAYERS.items():
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return layer
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS in {__file__}")


def _violations() -> set[tuple[str, str]]:
    mods = _modules()
    bad = set()
    for name, path in mods.items():
        layer = _layer(name)
        for target in _imports(name, path, mods):
            other = _layer(target)
            if other != layer and other not in ALLOWED[layer]:
                bad.add((name, target))
    return bad


def test_every_module_has_a_layer():
    for name in _modules():
        _layer(name)


def test_imports_go_one_way_between_layers():
    found = _violations()
    new = sorted(found - KNOWN)
    assert not new, "imports against the layering (importer, imported): " + "; ".join(map(str, new))
    fixed = sorted(KNOWN - found)
    assert not fixed, f"no longer imported, remove from KNOWN: {fixed}"
