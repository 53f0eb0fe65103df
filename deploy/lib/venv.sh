# The venv both installers make (deploy/control-plane/install.sh, deploy/node-agent/install.sh):
# one recipe and one stamp, so that either finds the venv the other made up to date. Sourced by
# them (ship deploy/lib with them), not run.
#
# install_venv PREFIX PYTHON SOURCE_DIR WHEELS ENTRY_POINT MODULE...
#   Installs Runplane into PREFIX/venv: a runplane-*.whl in WHEELS as it is, else a wheel built
#   from the checkout SOURCE_DIR; the dependencies offline from WHEELS when it is not empty. Does
#   nothing when the stamp names the same inputs and PREFIX/venv/bin/ENTRY_POINT exists. Checks
#   that MODULE... import. Sets venv_changed: 1 when it installed, 0 when it was up to date.
#   Needs die() from the caller.
install_venv() {
  local prefix=$1 python=$2 source_dir=$3 wheels=$4 entry=$5
  shift 5
  local pip_args=(--disable-pip-version-check --no-cache-dir -q) wheel="" inputs fingerprint stamp
  venv_changed=0
  if [[ -n "$wheels" ]]; then
    pip_args+=(--no-index --find-links "$wheels")
    wheel=$(ls "$wheels"/runplane-*.whl 2>/dev/null | sort | tail -n1 || true)
  fi
  if [[ -n "$wheel" ]]; then
    inputs=$(sha256sum "$wheel")
  else
    [[ -f "$source_dir/pyproject.toml" && -d "$source_dir/services" ]] || die "no Runplane checkout at $source_dir"
    inputs=$(cd "$source_dir" && find proto libs services -type f ! -path '*/__pycache__/*' ! -name '*.pyc' \
      | LC_ALL=C sort | xargs sha256sum && sha256sum pyproject.toml constraints.txt)
  fi
  fingerprint=$( { echo "$inputs"; [[ -n "$wheels" ]] && ls "$wheels"; "$python" -V; } | sha256sum | cut -c1-32)
  stamp="$prefix/venv/.runplane-install"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$fingerprint" && -x "$prefix/venv/bin/$entry" ]]; then
    echo "venv: $prefix/venv is up to date"
    return
  fi
  echo "venv: installing Runplane into $prefix/venv"
  mkdir -p "$prefix"
  [[ -x "$prefix/venv/bin/python" ]] || "$python" -m venv "$prefix/venv"
  local venv_python=$prefix/venv/bin/python constraints=() built
  [[ -f "$source_dir/constraints.txt" ]] && constraints=(-c "$source_dir/constraints.txt")
  built=$(mktemp -d)
  if [[ -n "$wheel" ]]; then
    cp "$wheel" "$built/"
  else
    "$venv_python" -m pip wheel "${pip_args[@]}" --no-deps -w "$built" "$source_dir" >/dev/null
  fi
  # The package itself anew (the same version may hold new code), then what it needs.
  "$venv_python" -m pip install "${pip_args[@]}" "${constraints[@]}" --force-reinstall --no-deps "$built"/runplane-*.whl
  "$venv_python" -m pip install "${pip_args[@]}" "${constraints[@]}" "$built"/runplane-*.whl
  rm -rf "$built"
  local modules
  modules=$(IFS=,; echo "$*")
  "$venv_python" -c "import $modules" || die "Runplane in $prefix/venv does not import ($modules)"
  echo "$fingerprint" > "$stamp"
  venv_changed=1
}
