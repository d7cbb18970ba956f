# Sourced by scripts/setup.sh and scripts/setup_label.sh: installs go through uv (pinned below), which unpacks and
# links wheels in parallel and keeps a cache, so a fresh environment takes seconds where pip took minutes. uv reads
# neither pip's configuration files nor its PIP_* variables: the package index, extra indexes, local wheel folders,
# constraint files and certificate bundle that pip is configured with here are handed to uv, so that both install
# from the same places. `uv_install VENV ARGS...` is `uv pip install ARGS...` into VENV (created first if absent).
UV_VERSION=0.13.8

_pip_setting() {  # the value of KEY in pip's configuration (read once into $_pip_conf by uv_setup)
  sed -n "s/^[^.]*\.$1='\(.*\)'\$/\1/p" <<< "$_pip_conf" | head -1
}

uv_setup() {
  local value _pip_conf
  _pip_conf=$("$PY" -m pip config list 2>/dev/null || true)
  value=$(_pip_setting index-url); [ -z "$value" ] || export UV_INDEX_URL="$value"
  value=$(_pip_setting extra-index-url); [ -z "$value" ] || export UV_EXTRA_INDEX_URL="$value"
  value=$(_pip_setting find-links); [ -z "$value" ] || export UV_FIND_LINKS="${value// /,}"
  value=$(_pip_setting constraint); [ -z "$value" ] || export UV_CONSTRAINT="$value"
  value=$(_pip_setting cert); [ -z "$value" ] || export SSL_CERT_FILE="$value"
  # pip takes the best version over all indexes; uv's default is the first index that has the package
  export UV_INDEX_STRATEGY=unsafe-best-match
  # bytecode: by compile_imports below, for what is imported, not for every installed file
  export UV_COMPILE_BYTECODE=0
}

# compile_imports VENV NAME...: bytecode for the modules the environment imports (scripts/compile_imports.py says how
# NAMEs read), written by importing them once. Where PYTHONDONTWRITEBYTECODE is set, Python never writes bytecode
# afterwards, and every process would compile MONAI, torch and the rest from source at each start (twice as slow).
# Compiling every installed file instead (uv's --compile-bytecode, pip's default) takes ten times as long as installing:
# about four in five of those files are never imported (packages' own tests, pip, most of Ray, sympy, pandas).
compile_imports() {
  local venv=$1
  shift
  "$venv/bin/python" scripts/compile_imports.py "$@"
}

uv_install() {
  local venv=$1
  shift
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  "$venv/bin/python" -m uv --version 2>/dev/null | grep -qE "^uv ${UV_VERSION}( |$)" \
    || "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" 2>/dev/null \
    || "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION"
  "$venv/bin/python" -m uv pip install --quiet --python "$venv/bin/python" "$@"
}
