"""medhybrid installed from its wheel, outside the clone: the shipped configs resolve, ``medhybrid data check`` and
``medhybrid infer`` run from a folder that is not the repository, every module imports without touching logging,
warning filters or the environment, and the console script lists its commands.

The wheel is built from a copy of the working tree (building in the clone would write ``build/`` there) with the
setuptools already in the dev environment, and installed without dependencies into a fresh virtual environment in
``tmp_path``; the dependencies come from the dev environment's site-packages, added by a ``.pth`` line. A ``.pth``
line adds a folder to ``sys.path`` without running the ``.pth`` files in it, so the dev environment's editable
medhybrid (``__editable__.medhybrid-*.pth`` and its finder) stays out: the tests check that ``medhybrid`` is the
installed copy.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest
from conftest import DATA, PH2, REPO_ROOT
from PIL import Image

SHIPPED = sorted(p.relative_to(REPO_ROOT / "configs").as_posix() for p in (REPO_ROOT / "configs").glob("*/*.yaml"))
"""The repository's configs, as ``<kind>/<name>.yaml``: every one must be in the wheel."""

IMAGES = ["IMD002", "IMD003"]


def _run(cmd: list, what: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)
    assert res.returncode == 0, f"{what} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


def _env(**extra: str) -> dict[str, str]:
    """The environment of the installed medhybrid: nothing pointing at the clone."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "MEDHYBRID_CONFIG_DIR", "MEDHYBRID_DATA_ROOT", "VIRTUAL_ENV")}
    env.setdefault("OMP_NUM_THREADS", "1")
    return {**env, **extra}


@pytest.fixture(scope="module")
def installed(data, tmp_path_factory) -> dict[str, Path]:
    """medhybrid's wheel installed in a new virtual environment: ``{"wheel", "venv", "python", "medhybrid", "work"}``
    (``work``: an empty folder outside the clone to run in)."""
    base = tmp_path_factory.mktemp("install")
    src = base / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.py[co]", "*.egg-info")
    for folder in ("medhybrid", "configs"):  # medhybrid/configs is a link to ../configs: copied as a link
        shutil.copytree(REPO_ROOT / folder, src / folder, symlinks=True, ignore=skip)
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / f, src / f)
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "--quiet",
          "--wheel-dir", base / "dist", src], "pip wheel", cwd=base)
    (wheel,) = (base / "dist").glob("medhybrid-*.whl")

    venv = base / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], "python -m venv", cwd=base)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "--quiet", wheel],
         "pip install <wheel>", cwd=base)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], "venv site-packages",
                     env=_env(), cwd=base).stdout.strip())
    dev_site = dict.fromkeys(sysconfig.get_path(k) for k in ("purelib", "platlib"))
    (site / "zz_medhybrid_test_dependencies.pth").write_text("".join(f"{p}\n" for p in dev_site))
    work = base / "work"
    work.mkdir()
    return {"wheel": wheel, "venv": venv, "python": python, "medhybrid": venv / "bin" / "medhybrid", "work": work}


def test_wheel_ships_the_configs(installed):
    with zipfile.ZipFile(installed["wheel"]) as z:
        names = set(z.namelist())
    configs = sorted(n.removeprefix("medhybrid/configs/") for n in names if n.startswith("medhybrid/configs/"))
    assert configs == SHIPPED, "the wheel's medhybrid/configs/ differs from the repository's configs/"
    assert {"ablation/dermoscopy.yaml", "data/ph2.yaml", "data/isic2018.yaml", "data/v7_covid.yaml", "data/openist.yaml",
            "pretrain/isic2018.yaml", "finetune/ph2.yaml"} <= set(configs)
    assert not [n for n in names if n.startswith(("bundles/", "tests/", "configs/"))], "only the package is shipped"


CHECK_CONFIGS = """
import json, os, sys
import medhybrid
from medhybrid.experiments.ablation import load_ablation
from medhybrid.core.config import ConfigError, config_dir, load_config
from medhybrid.data.specs import load_dataset_spec
from medhybrid.workflows.finetune import FinetuneConfig
from medhybrid.workflows.pretrain import PretrainConfig

data_root = os.environ.pop("MEDHYBRID_DATA_ROOT")
try:
    load_dataset_spec("ph2")
    no_root = None
except ConfigError as e:
    no_root = str(e)
os.environ["MEDHYBRID_DATA_ROOT"] = data_root
abl = load_ablation("dermoscopy", "quick", [])
chest = load_ablation("chest_xray", "quick", [])
pre = load_config(PretrainConfig, "isic2018", kind="pretrain")
ft = load_config(FinetuneConfig, "ph2", kind="finetune")
print(json.dumps({
    "medhybrid": medhybrid.__file__, "config_dir": str(config_dir()), "no_root": no_root,
    "ablation": [abl.name, str(abl.source.root), str(abl.target.root)], "chest": [str(chest.source.root), str(chest.target.root)],
    "pretrain": [pre.dataset.name, str(pre.dataset.root)], "finetune": [ft.dataset.name, str(ft.dataset.root)],
    "datasets": {n: str(load_dataset_spec(n).root) for n in ["isic2018", "ph2", "v7_covid", "openist"]},
}))
"""


def test_installed_package_resolves_shipped_configs(installed):
    """The shipped names resolve from the installed package's configs, datasets under MEDHYBRID_DATA_ROOT; without the
    variable, the error says to set it."""
    res = _run([installed["python"], "-c", CHECK_CONFIGS], "shipped configs", cwd=installed["work"],
               env=_env(MEDHYBRID_DATA_ROOT=str(DATA)))
    out = json.loads(res.stdout.strip().splitlines()[-1])
    venv = installed["venv"].resolve()
    assert Path(out["medhybrid"]).resolve().is_relative_to(venv), f"imported {out['medhybrid']}, not the installed wheel"
    assert Path(out["config_dir"]).is_relative_to(venv) and Path(out["config_dir"]).name == "configs"
    assert out["ablation"] == ["dermoscopy-quick", str(DATA / "dermoscopy" / "isic2018"), str(DATA / "dermoscopy" / "ph2")]
    assert out["chest"] == [str(DATA / "chest_xray" / "v7_covid"), str(DATA / "chest_xray" / "openist")]
    assert out["pretrain"] == ["isic2018", str(DATA / "dermoscopy" / "isic2018")]
    assert out["finetune"] == ["ph2", str(DATA / "dermoscopy" / "ph2")]
    assert out["datasets"] == {"isic2018": str(DATA / "dermoscopy" / "isic2018"), "ph2": str(DATA / "dermoscopy" / "ph2"),
                               "v7_covid": str(DATA / "chest_xray" / "v7_covid"),
                               "openist": str(DATA / "chest_xray" / "openist")}
    assert out["no_root"] and "dataset root" in out["no_root"] and "MEDHYBRID_DATA_ROOT is not set" in out["no_root"]


MAKE_MODEL = """
import sys
import torch
from medhybrid.data.specs import Preprocess
from medhybrid.networks.nets import ModelConfig, build_network
from medhybrid.networks.checkpoints import network_meta, save_model

torch.manual_seed(0)
cfg = ModelConfig(channels=(16, 32, 32), attention_levels=(False, False, False))
net = build_network(cfg, 3, 2)
save_model(net, network_meta(net, cfg, Preprocess(resolution=32), "ph2", "finetune", 2), sys.argv[1])
"""


@pytest.fixture(scope="module")
def tiny_model(installed) -> Path:
    """A tiny untrained binary RGB ``model.pt``, written by the installed package's own model-file functions (a bundle's
    ``models/model.pt`` is a plain state dict for ``monai.bundle``, not a file ``medhybrid infer`` reads)."""
    path = installed["work"].parent / "tiny_model.pt"
    _run([installed["python"], "-c", MAKE_MODEL, path], "writing a tiny model.pt", cwd=installed["work"], env=_env())
    return path


def test_installed_cli_checks_a_shipped_dataset(installed):
    """``medhybrid data check ph2`` with the installed console script, outside the clone, data under MEDHYBRID_DATA_ROOT."""
    res = _run([installed["medhybrid"], "data", "check", "ph2", "--split", "test", "--workers", "2"], "medhybrid data check",
               cwd=installed["work"], env=_env(MEDHYBRID_DATA_ROOT=str(DATA)))
    assert "dataset ph2: 100 pairs" in res.stdout and "no problems found" in res.stdout, res.stdout


@pytest.mark.slow
def test_installed_cli_segments_images(installed, tiny_model, tmp_path):
    """``medhybrid infer`` with the installed console script, outside the clone: one mask per PH2 image, at its size, 0/255."""
    inputs = [PH2 / "images" / f"{i}.png" for i in IMAGES]
    out = tmp_path / "masks"
    res = _run([installed["medhybrid"], "infer", "--model", tiny_model, "--input", *inputs, "--output", out, "--device", "cpu"],
               "medhybrid infer", cwd=installed["work"], env=_env())
    assert f"{len(IMAGES)} of {len(IMAGES)} image(s) segmented; {len(IMAGES)} mask(s)" in res.stdout, res.stdout
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{i}_mask.png" for i in IMAGES] + ["quality.csv"])
    for sid, image in zip(IMAGES, inputs, strict=True):
        with Image.open(image) as im, Image.open(out / f"{sid}_mask.png") as m:
            assert m.size == im.size and m.mode == "L", (sid, m.size, im.size, m.mode)
            values = set(np.unique(np.asarray(m)).tolist())
        assert values and values <= {0, 255}, f"{sid}: mask values {sorted(values)}"


LABEL_ONLY = {"medhybrid.label.main", "medhybrid.label.tasks"}
"""The MONAI Label app's modules: they import ``monailabel``, which lives in its own environment (``.venv-label``,
scripts/setup_label.sh; tests/test_label.py runs them there), not in the one medhybrid installs into."""

SUBCOMMANDS = {"data", "pretrain", "finetune", "ablate", "active", "report", "curve", "sync", "sample", "infer", "release"}
"""The commands README.md and ``medhybrid --help`` document."""

IMPORT_EVERYTHING = """
import ast, importlib, json, logging, os, pkgutil, sys, warnings
from pathlib import Path

import medhybrid

root = Path(medhybrid.__file__).parent
label_only = set(sys.argv[1].split(","))
# the third-party modules medhybrid imports (module level and function bodies), imported first: what they change on
# import (warning filters, loggers) is theirs; what changes after them is medhybrid's
deps = set()
for path in root.rglob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            deps |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            deps.add(node.module)
for name in sorted(d for d in deps if d.split(".")[0] != "medhybrid"):
    try:
        importlib.import_module(name)
    except ImportError:  # monailabel (label-only modules), optional extras: a module needing one fails below
        pass


def state():
    loggers = {"": logging.getLogger(), **{n: lg for n, lg in logging.root.manager.loggerDict.items()
                                          if isinstance(lg, logging.Logger)}}
    return {"handlers": {n: [repr(h) for h in lg.handlers] for n, lg in loggers.items() if lg.handlers},
            "filters": {n: [repr(f) for f in lg.filters] for n, lg in loggers.items() if lg.filters},
            "warnings": [repr(f) for f in warnings.filters], "environ": dict(os.environ)}


before = state()
imported, failed = [], {}
for info in pkgutil.walk_packages(medhybrid.__path__, "medhybrid.", onerror=lambda name: failed.setdefault(name, "walk")):
    if info.name in label_only:
        continue
    try:
        importlib.import_module(info.name)
        imported.append(info.name)
    except Exception as e:
        failed[info.name] = f"{type(e).__name__}: {e}"
after = state()
from medhybrid.core.config import PACKAGED_CONFIGS, config_dir

print(json.dumps({"file": medhybrid.__file__, "imported": imported, "failed": failed, "before": before, "after": after,
                  "packaged": str(PACKAGED_CONFIGS), "config_dir": str(config_dir()),
                  "configs": sorted(p.relative_to(PACKAGED_CONFIGS).as_posix() for p in PACKAGED_CONFIGS.glob("*/*.yaml"))}))
"""


def _source_modules() -> set[str]:
    """Every module of the repository's medhybrid/ (``__init__.py`` as its package)."""
    root = REPO_ROOT / "medhybrid"
    return {".".join(("medhybrid", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
            for p in root.rglob("*.py")} - {"medhybrid"}


def test_every_module_imports_and_changes_no_global_state(installed):
    """In a fresh process of the installed wheel, ``pkgutil.walk_packages`` finds every module of the repository's
    medhybrid/ (a folder without ``__init__.py`` would be left out of the wheel), each imports, and importing all of
    them, after the third-party modules they use, leaves alone the logging handlers and filters of every logger,
    ``warnings.filters`` and ``os.environ``. The shipped configs are found through the package (``PACKAGED_CONFIGS``,
    inside the installed package) and the configs resolve there when MEDHYBRID_CONFIG_DIR is not set."""
    assert importlib.util.find_spec("monailabel") is None, "monailabel in this environment: import the label app too"
    res = _run([installed["python"], "-c", IMPORT_EVERYTHING, ",".join(sorted(LABEL_ONLY))], "importing every module",
               cwd=installed["work"], env=_env())
    out = json.loads(res.stdout.strip().splitlines()[-1])
    venv = installed["venv"].resolve()
    assert Path(out["file"]).resolve().is_relative_to(venv), out["file"]
    assert out["failed"] == {}, out["failed"]
    assert LABEL_ONLY <= _source_modules()  # the exclusions name real modules
    assert set(out["imported"]) == _source_modules() - LABEL_ONLY
    before, after = out["before"], out["after"]
    assert after["handlers"] == before["handlers"], "logging handlers added on import"
    assert after["filters"] == before["filters"], "logging filters added on import"
    assert after["warnings"] == before["warnings"], [f for f in after["warnings"] if f not in before["warnings"]]
    assert after["environ"] == before["environ"], {k: v for k, v in after["environ"].items() if before["environ"].get(k) != v}
    assert Path(out["packaged"]).resolve().is_relative_to(venv) and Path(out["packaged"]).name == "configs"
    assert out["config_dir"] == str(Path(out["packaged"]).resolve())
    assert out["configs"] == SHIPPED


def test_console_script_lists_its_subcommands(installed, tmp_path):
    """The ``medhybrid`` console script beside this environment's Python runs medhybrid.cli: ``--help`` lists every
    subcommand of its parser (those README.md documents among them) and exits 0. The entry point is medhybrid.cli:main
    here and in the wheel, whose own script the tests above run."""
    from medhybrid.cli import build_parser

    script = Path(sys.executable).parent / "medhybrid"
    assert script.is_file() and os.access(script, os.X_OK), f"no console script {script}"
    res = _run([script, "--help"], "medhybrid --help", cwd=tmp_path, env=_env())
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert SUBCOMMANDS <= set(sub.choices)
    listed = set(res.stdout.split("{", 1)[1].split("}", 1)[0].split(","))
    assert listed == set(sub.choices), res.stdout
    for name in sub.choices:
        assert re.search(rf"^\s+{name}\s+\S", res.stdout, re.M), f"{name}: no help line\n{res.stdout}"
    (ep,) = importlib.metadata.entry_points(group="console_scripts", name="medhybrid")
    assert ep.value == "medhybrid.cli:main"
    with zipfile.ZipFile(installed["wheel"]) as z:
        (ep_file,) = [n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt")]
        assert "medhybrid = medhybrid.cli:main" in z.read(ep_file).decode()
    assert installed["medhybrid"].is_file() and os.access(installed["medhybrid"], os.X_OK)


def _runtime_imports(path: Path) -> set[str]:
    """The medhybrid modules a source file imports when it runs (``if TYPE_CHECKING:`` blocks left out)."""
    import ast

    tree = ast.parse(path.read_text())
    typing_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING"
                   for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("medhybrid")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("medhybrid"):
            found.add(node.module)
    return found


def test_no_module_imports_one_that_imports_it_back():
    """The package's import graph has no cycle (function-level imports included)."""
    root = REPO_ROOT / "medhybrid"
    graph = {}
    for p in root.rglob("*.py"):
        name = ".".join(("medhybrid", *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        graph[name] = _runtime_imports(p)

    def reach(m: str, seen: set[str]) -> set[str]:
        for d in graph.get(m, ()):
            if d not in seen:
                seen.add(d)
                reach(d, seen)
        return seen

    assert [m for m in sorted(graph) if m in reach(m, set())] == []


# --------------------------------------------------------------------------------------------- the environment
def test_setup_compiled_what_a_test_process_imports_at_its_start():
    """scripts/setup.sh writes bytecode for the modules medhybrid and its tools import (scripts/compile_imports.py):
    every installed module a test process imports before its first test (pytest, xdist, torch, MONAI, Ignite, MLflow,
    medhybrid's CLI, as conftest.py found them) has it, so no process compiles them from source at each start.
    (torch.compile's own modules are left to the processes that compile.)"""
    from conftest import STARTUP_MODULES

    site = sysconfig.get_paths()["purelib"]
    missing = sorted(name for name, f in STARTUP_MODULES.items()
                     if f.endswith(".py") and f.startswith(site) and name not in ("__main__", "__mp_main__")
                     and not name.startswith(("__editable__", "_distutils_hack"))
                     and not os.path.exists(importlib.util.cache_from_source(f)))
    assert len(STARTUP_MODULES) > 1000 and missing == [], f"{len(missing)} modules without bytecode, e.g. {missing[:10]}"
