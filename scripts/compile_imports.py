"""Write the bytecode of the modules an environment imports, by importing them once (scripts/uv_env.sh runs this with
bytecode writing on, whatever PYTHONDONTWRITEBYTECODE says).

    .venv/bin/python scripts/compile_imports.py monai torch.distributed.run 'medhybrid.*' dir:mlflow/store/db_migrations

``name`` imports a module, ``name.*`` the package and every module below it, ``dir:path`` compiles every file of a
folder of site-packages (files loaded by path, such as MLflow's database migrations). A module that cannot be imported
here is counted and left out: an import that fails does so again, with its own message, where it is used.
"""

from __future__ import annotations

import compileall
import importlib
import pkgutil
import sys
import sysconfig
import time
import warnings
from pathlib import Path


def main(names: list[str]) -> None:
    sys.dont_write_bytecode = False
    warnings.simplefilter("ignore")
    start, before, failed = time.perf_counter(), len(sys.modules), []
    for name in names:
        if name.startswith("dir:"):
            folder = Path(sysconfig.get_paths()["purelib"]) / name[4:]
            if not compileall.compile_dir(folder, quiet=2):
                failed.append(name)
            continue
        package = name.removesuffix(".*")
        try:
            mod = importlib.import_module(package)
        except Exception:  # noqa: BLE001 - any failure: left out, counted
            failed.append(package)
            continue
        if name.endswith(".*") and hasattr(mod, "__path__"):
            for info in pkgutil.walk_packages(mod.__path__, f"{package}.", onerror=failed.append):
                try:
                    importlib.import_module(info.name)
                except Exception:  # noqa: BLE001
                    failed.append(info.name)
    print(f"{len(sys.modules) - before} modules imported, their bytecode written, in {time.perf_counter() - start:.0f} s"
          + (f"; {len(failed)} not importable here: {', '.join(failed[:5])}{' ...' if len(failed) > 5 else ''}" if failed else ""))


if __name__ == "__main__":
    main(sys.argv[1:])
