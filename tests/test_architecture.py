"""The import direction of the package, checked on the source: every `import adaskip...` (top-level or inside a
function) goes to the same layer or a lower one, and function-local imports of our own modules are not used to hide
an upward edge. docs/architecture.md describes the layers."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "adaskip"

# lowest first; a module belongs to the first layer with a prefix that matches it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("model", ("adaskip", "adaskip.errors", "adaskip.similarity", "adaskip.model")),
    ("plan", ("adaskip.plan",)),
    ("policy", ("adaskip.layout", "adaskip.policy", "adaskip.cost", "adaskip.engine_dir")),
    ("runtime", ("adaskip.runtime",)),
    ("export/calibrate", ("adaskip.export", "adaskip.calibrate")),
    ("build/eval/deploy", ("adaskip.builder", "adaskip.eval", "adaskip.deploy")),
    ("cli", ("adaskip.cli",)),
]

# modules that run inside another program (Triton's Python backend stub, trtllm-build's model loader) and import
# our package only once that program has set up the environment
LATE_IMPORTERS = {"adaskip.deploy.model", "adaskip.export.trtllm.model_class"}


def layer_of(module: str) -> int:
    best, rank = -1, None
    for r, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), r
    if rank is None:
        raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")
    return rank


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, root: Path = PACKAGE) -> list[tuple[str, int, bool]]:
    """(imported adaskip module, line, inside a function) for every import of our package in `path`."""
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, int, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, in_function) for a in child.names if a.name.split(".")[0] == "adaskip")
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0 \
                    and child.module.split(".")[0] == "adaskip":
                for a in child.names:  # `from adaskip.eval import bench` names a module too
                    sub = f"{child.module}.{a.name}"
                    target = sub if (root.parent / (sub.replace(".", "/") + ".py")).is_file() \
                        or (root.parent / sub.replace(".", "/")).is_dir() else child.module
                    found.append((target, child.lineno, in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def violations(root: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        here = module_name(path, root)
        for target, line, local in imports_of(path, root):
            where = f"{path.relative_to(root.parent)}:{line}"
            if layer_of(target) > layer_of(here):
                out.append(f"{where}: {here} ({LAYERS[layer_of(here)][0]}) imports {target} "
                           f"({LAYERS[layer_of(target)][0]}), a higher layer")
            elif local and here not in LATE_IMPORTERS:
                out.append(f"{where}: {here} imports {target} inside a function (import our own modules at the top; "
                           f"function-local imports are for optional heavy third-party packages)")
    return out


def test_imports_run_one_way():
    assert violations() == []


def test_the_check_catches_a_planted_upward_import(tmp_path):
    pkg = tmp_path / "adaskip"
    for sub in ("runtime", "eval", "model"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "eval" / "bench.py").write_text("from adaskip.runtime import engine\n")  # downward: fine
    (pkg / "runtime" / "engine.py").write_text("def f():\n    from adaskip.eval.bench import x\n")  # upward, hidden
    (pkg / "model" / "spec.py").write_text("import adaskip.runtime.engine\n")  # upward, top level
    found = violations(pkg)
    assert len(found) == 2, found
    assert any("adaskip/runtime/engine.py:2" in v and "higher layer" in v for v in found)
    assert any("adaskip/model/spec.py:1" in v for v in found)


@pytest.mark.parametrize("module,layer", [("adaskip.runtime.trt.engine", "runtime"), ("adaskip.cost", "policy"),
                                          ("adaskip.cli.build", "cli"), ("adaskip", "model")])
def test_layer_assignment(module, layer):
    assert LAYERS[layer_of(module)][0] == layer
