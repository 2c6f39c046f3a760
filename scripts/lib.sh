# Shared by scripts/demo and scripts/test: idempotent installation of what they need.
# Sourced, not run.

# apt_need PROGRAM:PACKAGE ... — installs the packages whose program is missing.
apt_need() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  apt_install "${missing[@]}"
}

# apt_need_pkg PACKAGE ... — installs the packages (libraries, headers) not installed.
apt_need_pkg() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
  done
  apt_install "${missing[@]}"
}

apt_install() {
  local missing=("$@")
  ((${#missing[@]})) || return 0
  if [ "$(id -u)" != 0 ]; then
    echo "missing: ${missing[*]}; install them with: sudo apt-get install ${missing[*]}" >&2
    return 1
  fi
  echo "installing ${missing[*]} ..." >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# The build's system libraries: nftnl links libnftnl and libmnl (found by pkg-config).
build_need() {
  apt_need pkg-config:pkg-config
  apt_need_pkg libnftnl-dev libmnl-dev
}

# The tests' independent Python peers, in target/pyvenv (a virtualenv, so the system's
# Python is left alone): pymodbus, the Modbus simulator, and python-tuf (with the
# cryptography its Ed25519 checks need), the second TUF implementation.
python_peers_need() {
  local venv=target/pyvenv modbus=3.8.6 tuf=6.0.0 ssl=1.6.0
  if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "
import sys, pymodbus, tuf, securesystemslib, cryptography
sys.exit(not (pymodbus.__version__ == '$modbus' and tuf.__version__ == '$tuf' and securesystemslib.__version__ == '$ssl'))" 2>/dev/null; then
    return 0
  fi
  apt_need python3:python3
  if ! python3 -m venv "$venv" 2>/dev/null; then
    apt_need_pkg python3-venv
    python3 -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q "pymodbus==$modbus" "tuf==$tuf" "securesystemslib[crypto]==$ssl"
}

# rust_need COMPONENT ... — adds rustup components that are missing.
rust_need() {
  local c
  for c in "$@"; do
    rustup component list --installed 2>/dev/null | grep -q "^$c-" || rustup component add "$c"
  done
}
