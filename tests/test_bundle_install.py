"""A bundle installs from its own folder: packaged (``scripts/package_bundle.py``), copied away from the repository,
installed into a fresh virtual environment with the command its README gives, its ``inference.json`` writes the same
masks, byte for byte, as ``medhybrid infer``. The fresh environment reuses the third-party packages already installed
(a path entry to them, as an offline package cache would serve them); medhybrid itself comes only from the bundle's
wheel. And the metadata, read through MONAI's own parser, requires what the bundle needs, medhybrid first."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
from conftest import PH2, REPO_ROOT
from monai.bundle import ConfigParser

BUNDLES = [REPO_ROOT / "bundles" / n for n in ("dermoscopy_lesion_segmentation", "chest_xray_lung_segmentation")]
OPENIST = PH2.parents[1] / "chest_xray" / "openist"


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_metadata_as_monai_reads_it_requires_everything_medhybrid_first(bundle):
    """``monai.bundle run`` reads the metadata with ``ConfigParser.read_meta``, which renames deprecated keys; what it
    reads must still name medhybrid (at this version) and every package the bundle imports."""
    import medhybrid

    parser = ConfigParser()
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    meta = parser["_meta_"]
    required = meta["required_packages_version"]
    assert required["medhybrid"] == medhybrid.__version__
    assert {"pytorch-ignite", "pydicom", "highdicom", "mlflow", "simpleitk", "nibabel", "jsonschema"} <= set(required)
    assert "optional_packages_version" not in meta


def _fresh_venv(where: Path) -> Path:
    """A new virtual environment whose only view of the installed third-party packages is one path entry to them (no
    .pth of theirs runs, so the repository's editable medhybrid is not importable)."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    py = where / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    (Path(site) / "reuse_installed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return py


def _readme_install(bundle: Path) -> str:
    readme = (bundle / "docs" / "README.md").read_text()
    (cmd,) = re.findall(r"^python3\.11 -m venv \.venv && (\.venv/bin/pip install wheels/\S+\.whl)$", readme, re.M)
    return cmd


@pytest.mark.slow(seconds=150)
@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda b: b.name)
def test_a_copied_bundle_installs_from_its_folder_and_segments_like_medhybrid_infer(bundle, tmp_path):
    from medhybrid.workflows.inference import infer_files

    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "package_bundle.py"), str(bundle), str(tmp_path / "dist")],
                   check=True, capture_output=True)
    copy = tmp_path / "elsewhere" / bundle.name
    shutil.copytree(tmp_path / "dist" / bundle.name, copy)
    py = _fresh_venv(copy / ".venv")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    install = _readme_install(copy).replace(".venv/bin/pip", f"{py} -m pip", 1).split()
    # the fresh environment has no pip of its own: the installed one runs in it (python -m pip from the reused path)
    res = subprocess.run(install, cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    where = subprocess.run([str(py), "-c", "import medhybrid; print(medhybrid.__file__)"], cwd=copy, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(copy / ".venv")), where  # medhybrid from the bundle's wheel, not the repository

    src = PH2 if "dermoscopy" in bundle.name else OPENIST
    images = tmp_path / "images"
    images.mkdir()
    for f in sorted((src / "images").iterdir())[:3]:
        shutil.copy(f, images)
    res = subprocess.run([str(py), "-m", "monai.bundle", "run", "--config_file", "configs/inference.json", "--input_dir",
                          str(images), "--output_dir", str(tmp_path / "bundle-masks")], cwd=copy, env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Detected deprecated name" not in res.stdout + res.stderr  # MONAI's warning about the old metadata key
    infer_files(bundle, [images], tmp_path / "infer-masks", quality=False)
    ours = sorted(p.name for p in (tmp_path / "infer-masks").glob("*_mask.png"))
    theirs = sorted(p.name for p in (tmp_path / "bundle-masks").glob("*_mask.png"))
    assert ours == theirs and len(ours) == 3
    for name in ours:
        assert (tmp_path / "infer-masks" / name).read_bytes() == (tmp_path / "bundle-masks" / name).read_bytes(), name
