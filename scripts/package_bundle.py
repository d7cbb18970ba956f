"""Package a medhybrid bundle for people without the repository: a copy of the bundle's folder with the wheel of the
medhybrid it needs in ``wheels/``, so that the bundle installs from its own folder (its README's install command) on a
machine that reaches only the package registries. medhybrid is not published on PyPI: never ``pip install medhybrid``.

    .venv/bin/python scripts/package_bundle.py bundles/dermoscopy_lesion_segmentation dist/

writes ``dist/dermoscopy_lesion_segmentation/`` (the bundle, ``wheels/medhybrid-<version>-py3-none-any.whl``) and,
with ``--zip``, ``dist/dermoscopy_lesion_segmentation.zip``. The bundle's ``configs/metadata.json`` must require the
medhybrid version being packaged.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def package(bundle: Path, dest: Path, make_zip: bool = False) -> Path:
    sys.path.insert(0, str(REPO))
    import medhybrid

    bundle = bundle.resolve()
    want = json.loads((bundle / "configs" / "metadata.json").read_text())["required_packages_version"]["medhybrid"]
    if want != medhybrid.__version__:
        sys.exit(f"{bundle / 'configs' / 'metadata.json'} requires medhybrid {want}, the repository is {medhybrid.__version__}")
    out = dest.resolve() / bundle.name
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(bundle, out, ignore=shutil.ignore_patterns("eval", "runs", "__pycache__", "wheels"))
    wheels = out / "wheels"
    with tempfile.TemporaryDirectory() as src:  # a copy of the sources: setuptools writes its build folders beside them,
        src = Path(src)                          # and two packagings at once must not share them
        for f in ("pyproject.toml", "README.md"):
            shutil.copy(REPO / f, src / f)
        shutil.copytree(REPO / "medhybrid", src / "medhybrid", symlinks=False,
                        ignore=shutil.ignore_patterns("__pycache__", "logs"))
        res = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w",
                              str(wheels), str(src)], capture_output=True, text=True)
    if res.returncode:
        sys.exit(f"building medhybrid's wheel failed:\n{res.stderr[-3000:]}")
    built = sorted(wheels.glob(f"medhybrid-{medhybrid.__version__}-*.whl"))
    if len(built) != 1:
        sys.exit(f"expected one medhybrid {medhybrid.__version__} wheel in {wheels}, found {[p.name for p in built]}")
    if make_zip:
        shutil.make_archive(str(out), "zip", out.parent, out.name)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle", type=Path)
    ap.add_argument("dest", type=Path)
    ap.add_argument("--zip", action="store_true", help="also write <dest>/<bundle>.zip")
    args = ap.parse_args()
    out = package(args.bundle, args.dest, args.zip)
    print(f"packaged: {out} (wheel: {next((out / 'wheels').glob('*.whl')).name})")


if __name__ == "__main__":
    main()
