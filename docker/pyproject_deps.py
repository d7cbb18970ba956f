"""Print the ``[project] dependencies`` of a pyproject.toml as a requirements file, minus the named packages.

The Dockerfiles install medhybrid's pinned dependencies in a layer of their own (rebuilt only when
pyproject.toml changes), then medhybrid itself with ``--no-deps``. An image that needs another pin for
a package leaves it out here and names its own: the CUDA images take torch 2.14.1 (pyproject.toml pins
the CPU torch of the development machines), the MONAI Label image needs ``pydicom<3`` and the numpy and
jsonschema that MONAI Label's dependencies allow.

    python pyproject_deps.py pyproject.toml --exclude torch > requirements.txt

Naming a package that pyproject.toml does not list is an error, so a renamed pin cannot slip through.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib

_NAME = re.compile(r"\s*([A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)")


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    m = _NAME.match(requirement)
    if m is None:
        raise ValueError(f"cannot read the package name of requirement {requirement!r}")
    return normalize(m.group(1))


def dependencies(pyproject: str, exclude: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The project's dependencies in pyproject order, without those named in ``exclude``."""
    with open(pyproject, "rb") as f:
        deps = tomllib.load(f)["project"]["dependencies"]
    drop = {normalize(n) for n in exclude}
    missing = drop - {requirement_name(d) for d in deps}
    if missing:
        raise ValueError(f"{pyproject} does not list {', '.join(sorted(missing))}")
    return [d.strip() for d in deps if requirement_name(d) not in drop]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pyproject", help="path to pyproject.toml")
    p.add_argument("--exclude", nargs="*", default=[], metavar="NAME", help="packages to leave out")
    args = p.parse_args(argv)
    try:
        print("\n".join(dependencies(args.pyproject, args.exclude)))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
