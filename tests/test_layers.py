"""The package's imports go one way: matrix <- curvature <- core <- llm <- apps.

Walks every module's imports (ast, no import executed): a module may import
package modules of a lower layer, or of its own sub-package; the import graph
has no cycle; and no package module is imported inside a function (a hidden
cycle), except by the command line's entry point, which imports the
applications lazily so that ``laplace-lora --help`` stays fast.
"""

from __future__ import annotations

import ast
from pathlib import Path

import laplace_lora_backend

ROOT = Path(laplace_lora_backend.__file__).parent
PKG = "laplace_lora_backend"

# lower number = lower layer; a module may import only from lower layers
# (or from its own sub-package, e.g. matrix.kron <- matrix.lowrank)
LAYERS = {
    "_version": 0,
    "_codec": 0,
    "errors": 0,
    "matrix": 0,
    "curvature": 1,
    "attention": 1,
    "_adapter_check": 2,
    "_settings_codec": 2,
    "glm": 2,
    "hf_models": 2,
    "validation": 2,
    "uncertainty": 2,
    "trust_region": 3,
    "prior_groups": 3,
    "prior_validation": 3,
    "distributed": 3,
    "token_validation": 3,
    "token_prior": 4,
    "prior": 5,
    "predictive": 3,
    "next_token": 3,
    "generation": 4,
    "serialization": 3,
    "lora_prior": 3,
    "fitted_state": 3,
    "loralaplace": 6,
    "structures": 7,
    "": 8,  # the package root: the public API
    "llm.answer_tokens": 9,
    "llm": 9,
    "demo.data": 10,
    "demo.smollm2": 10,
    "demo.finetune": 10,
    "demo.metrics": 10,
    "demo.config": 11,
    "demo.baselines": 11,
    "demo.splits": 11,
    "demo.prior": 11,
    "demo.models": 11,
    "demo.report": 11,
    "demo.run": 12,
    "demo": 13,
    "commands.files": 14,
    "commands.task": 15,
    "commands.arguments": 14,
    "commands.run": 16,
    "commands": 17,
    "cli": 18,
    "__main__": 19,
}
LAZY_IMPORTS_ALLOWED = {"cli"}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out[".".join(parts)] = path
    return out


def _layer(module: str) -> int:
    parts = module.split(".")
    for i in range(len(parts), -1, -1):
        key = ".".join(parts[:i])
        if key in LAYERS:
            return LAYERS[key]
    raise AssertionError(f"module {module!r} has no layer in LAYERS")


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported package module, inside a function) for every import."""
    tree = ast.parse(path.read_text())
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            if name == PKG or name.startswith(PKG + "."):
                out.append((name.removeprefix(PKG).lstrip("."), id(node) in inside))
    return out


def _subpackage(module: str, path: Path | None = None) -> str:
    """The sub-package a module belongs to ("" for top-level modules)."""
    if path is not None and path.name == "__init__.py":
        return module.split(".")[0]
    return module.split(".")[0] if "." in module else ""


def test_every_module_has_a_layer():
    for module in _modules():
        _layer(module)


def test_imports_go_down_the_layers():
    bad = []
    for module, path in _modules().items():
        for target, _ in _imports(path):
            own = _subpackage(module, path)
            same_package = own and own == target.split(".")[0]
            if not same_package and _layer(target) >= _layer(module):
                bad.append(f"{module} (layer {_layer(module)}) imports {target}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {m: {t for t, _ in _imports(p)} for m, p in _modules().items()}
    done, stack = set(), []

    def visit(m):
        if m in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack + [m]))
        if m in done or m not in graph:
            return
        stack.append(m)
        for t in graph[m]:
            visit(t)
        stack.pop()
        done.add(m)

    for m in graph:
        visit(m)


def test_no_package_import_inside_a_function():
    bad = [
        f"{module} imports {target} inside a function"
        for module, path in _modules().items()
        for target, lazy in _imports(path)
        if lazy and module not in LAZY_IMPORTS_ALLOWED
    ]
    assert not bad, "\n".join(bad)


# size limits of the library (benchmarks and tests excepted): a function's code
# is counted without its docstring (laplace-torch's signatures and their
# NumPy docstrings are long by design)
MAX_FILE_LINES, MAX_CLASS_LINES, MAX_FUNCTION_CODE_LINES = 400, 300, 60


def _code_lines(node: ast.AST) -> int:
    body = node.body
    first = body[0]
    is_doc = isinstance(first, ast.Expr) and isinstance(
        getattr(first, "value", None), ast.Constant
    )
    if is_doc and len(body) > 1:
        first = body[1]
    return node.end_lineno - first.lineno + 1


def test_files_classes_and_functions_stay_small():
    bad = []
    for module, path in _modules().items():
        source = path.read_text()
        if source.count("\n") > MAX_FILE_LINES:
            bad.append(f"{module}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.ClassDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_CLASS_LINES:
                    bad.append(f"{module}.{node.name}: class of {n} lines")
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = _code_lines(node)
                if n > MAX_FUNCTION_CODE_LINES:
                    bad.append(f"{module}.{node.name}: {n} lines of code")
    assert not bad, "\n".join(bad)
