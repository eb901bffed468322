"""Imports run one way: no module imports one of a higher layer (lazy imports inside functions count).

The layers, lowest first; a module may import its own layer and those below it:

0. base: the package root, ``errors`` and the private helpers (``_io``, ``_text``, ``_env``)
1. adapters: ``nnunet`` (the one door to nnU-Net), ``integrity`` (input checks), ``runtimes`` (the one
   way to open an ONNX Runtime session or wrap a torch network) and the leaf measurement module
   ``validation.metrics`` (every Dice and label reader)
2. spine: ``bundle`` (the manifest schema)
3. model: ``exporter`` (decomposition, rebuilding, ONNX export)
4. engines: ``engines`` (backends, keys, builds)
5. preparation: ``pipeline`` (model folder -> decomposed, exported, built bundle)
6. runs: ``case_pipeline``, ``inference``, ``finetune``, ``validation``, ``scaleout``
7. orchestration: ``demo``, ``demo_pipeline``, ``doctor``, ``benchmarks``
8. the command line: ``cli``
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "tucker_export"

LAYERS: list[tuple[str, ...]] = [
    ("tucker_export", "tucker_export.errors", "tucker_export._io", "tucker_export._text", "tucker_export._env"),
    ("tucker_export.nnunet", "tucker_export.integrity", "tucker_export.validation.metrics", "tucker_export.runtimes"),
    ("tucker_export.bundle",),
    ("tucker_export.exporter",),
    ("tucker_export.engines",),
    ("tucker_export.pipeline",),
    ("tucker_export.case_pipeline", "tucker_export.inference", "tucker_export.finetune", "tucker_export.validation",
     "tucker_export.scaleout"),
    ("tucker_export.demo", "tucker_export.demo_pipeline", "tucker_export.doctor",
     "tucker_export.benchmarks"),
    ("tucker_export.cli",),
]


def layer_of(module: str) -> int:
    """The layer of the longest matching prefix (``validation.metrics`` before ``validation``)."""
    best, best_length = None, -1
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            matches = module == prefix or module.startswith(prefix + ".")
            if matches and len(prefix) > best_length and (prefix != "tucker_export" or module == prefix):
                best, best_length = index, len(prefix)
    if best is None:
        raise AssertionError(f"module {module} is in no layer; add it to LAYERS in {__file__}")
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("tucker_export"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.add(".".join([*base, node.module] if node.module else base))
            elif node.module and node.module.startswith("tucker_export"):
                found.add(node.module)
    return found


def test_no_module_imports_a_higher_layer():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        importer = module_name(path)
        for imported in imported_modules(path):
            if layer_of(imported) > layer_of(importer):
                upward.append(f"{importer} (layer {layer_of(importer)}) imports {imported} (layer {layer_of(imported)})")
    assert not upward, "\n".join(upward)


def test_the_layer_map_knows_every_module():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))
