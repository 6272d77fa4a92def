"""The package's layer rules (docs/architecture.md) hold in the code: every import, function-local ones
included, goes to the same or a lower layer, and no module imports itself back through others."""
from __future__ import annotations

import ast
from pathlib import Path

from .conftest import ROOT

PACKAGE = ROOT / "ecgflowcmr"
# Lowest first. A unit is a subpackage or a top-level module of ecgflowcmr.
LAYERS = (
    ("__init__", "contract", "config", "cli", "utils"),   # foundations: shapes, config, loop, checkpoints
    ("data",),                                             # readers, R-peaks, preparation, datasets
    ("phantom", "metrics"),                                # the instrument (writes files); measurements
    ("ecg",),                                              # stage 1
    ("vae",),                                              # stage 2
    ("flow",),                                             # stage 3 and generation
    ("downstream", "official"),                            # synthetic pretraining; the published files
    ("prepare_data", "train_ecg", "train_disentangle_vae3d", "train_flow", "infer_flow", "evaluation",
     "convert_official", "gpu_plan"),                      # entry points, converter and planners
)
LAYER = {unit: depth for depth, units in enumerate(LAYERS) for unit in units}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _imports(name: str, path: Path, mods: dict) -> set[str]:
    """The ecgflowcmr modules ``name`` imports (anywhere in the file)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for _, target, names in _import_targets(path, package):
        if not names:                                    # import X
            out.add(target)
        out.update(f"{target}.{n}" if f"{target}.{n}" in mods else target for n in names)
    return {m for m in out if m in mods and m != name}


def _import_targets(path: Path, package: str) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) of every import in a file: ``from X import a, b`` gives (X, [a, b]),
    relative ones resolved; ``import X`` gives (X, [])."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, alias.name, []) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                module = ".".join(parts[:len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            out.append((node.lineno, module, [alias.name for alias in node.names]))
    return out


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_unit_has_a_layer():
    units = {_unit(m) for m in _modules()}
    assert units <= set(LAYER), f"place these in LAYERS (and docs/architecture.md): {sorted(units - set(LAYER))}"


def test_no_import_reaches_up_a_layer():
    mods = _modules()
    upward = [f"{m} -> {t}" for m, path in mods.items() for t in _imports(m, path, mods)
              if LAYER.get(_unit(t), 0) > LAYER.get(_unit(m), 0)]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(upward))


def test_no_import_circle():
    mods = _modules()
    graph = {m: _imports(m, path, mods) for m, path in mods.items()}
    state, stack, circles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == "open":
                circles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in graph:
        if m not in state:
            visit(m)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_checks_see_an_upward_import(tmp_path):
    """The rule checker itself: a data module importing a stage is reported."""
    mods = {"ecgflowcmr.data.x": tmp_path / "x.py", "ecgflowcmr.flow.y": tmp_path / "y.py"}
    (tmp_path / "x.py").write_text("def f():\n    from ..flow.y import g\n")
    assert _imports("ecgflowcmr.data.x", mods["ecgflowcmr.data.x"], mods) == {"ecgflowcmr.flow.y"}
    assert LAYER[_unit("ecgflowcmr.flow.y")] > LAYER[_unit("ecgflowcmr.data.x")]


def test_every_import_of_the_package_names_a_module_that_exists():
    """After a module moves, no import (function-local ones, benchmarks and tests included) still
    names its old place: each ``from ecgflowcmr.X import Y`` finds X as a module of the package."""
    mods = _modules()
    files = [(p, m if p.name == "__init__.py" else m.rsplit(".", 1)[0]) for m, p in mods.items()]
    files += [(p, "") for folder in ("benchmarks", "tests") for p in (ROOT / folder).rglob("*.py")]
    stale = [f"{path.relative_to(ROOT)}:{line} {module}"
             for path, package in files for line, module, _ in _import_targets(path, package)
             if module.startswith("ecgflowcmr") and module not in mods]
    assert not stale, "imports of modules that do not exist:\n" + "\n".join(stale)
