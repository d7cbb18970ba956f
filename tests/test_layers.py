"""The package's layers: no module imports from a layer above its own (every import statement, at module level or
inside a function), and the two top floors, the MONAI Label app and the research harness, never import each other."""

import ast
from pathlib import Path

import medhybrid

PACKAGE = Path(medhybrid.__file__).parent

LAYERS = {"core": 0, "data": 1, "networks": 2, "engines": 3, "workflows": 4, "label": 5, "experiments": 5, "cli": 6}
"""Each subpackage (or top-level module) and its floor; ``medhybrid`` itself (its lazy ``__init__``) is not a layer."""


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "medhybrid" else None


def _imports(path: Path, module: str) -> list[tuple[int, str]]:
    """(line, imported medhybrid module) of every import in the file, relative ones resolved."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("medhybrid")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if not name.startswith("medhybrid"):
                continue
            if name == "medhybrid":  # "from medhybrid import data": a subpackage; other names are the root's own
                out += [(node.lineno, f"{name}.{a.name}") for a in node.names if a.name in LAYERS]
            elif _layer(name) in LAYERS and name.count(".") == 1 and name.split(".")[1] != "cli":
                # "from medhybrid.data import io": the names are modules of that subpackage
                out += [(node.lineno, f"{name}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, name))
    return out


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, ".".join(parts)


def test_every_module_lives_in_a_layer():
    stray = [m for _, m in _modules() if m != "medhybrid" and _layer(m) not in LAYERS]
    assert not stray, f"modules outside the layers {sorted(LAYERS)}: {stray}"


def test_no_module_imports_a_layer_above_its_own():
    wrong = []
    for path, module in _modules():
        own = _layer(module)
        if own is None:
            continue
        for line, imported in _imports(path, module):
            other = _layer(imported)
            if other is None or other == own:
                continue
            if LAYERS[other] > LAYERS[own] or (LAYERS[other] == LAYERS[own]):
                wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({own}, floor {LAYERS[own]}) imports {imported} "
                             f"({other}, floor {LAYERS[other]})")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_the_walk_sees_imports_inside_functions_and_relative_ones(tmp_path):
    """The checker itself: an import inside a function, and a relative one, are found and resolved."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from medhybrid.experiments import report\n\nfrom ..workflows.finetune import run_finetuning\n")
    found = {name for _, name in _imports(f, "medhybrid.engines.m")}
    assert found == {"medhybrid.experiments.report", "medhybrid.workflows.finetune"}


def test_each_subpackage_says_what_it_may_import():
    for sub in LAYERS:
        init = PACKAGE / sub / "__init__.py"
        if sub == "cli":
            continue
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc.lower(), f"{init}: its docstring must say what the layer may import"
