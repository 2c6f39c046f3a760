# Shared by scripts/demo and scripts/test: idempotent installation of what they need.
# Sourced, not run.

# apt_need PROGRAM:PACKAGE ... — installs the packages whose program is missing.
apt_need() {
  local missing=() pair
  for pair in "$@"; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
  done
  ((${#missing[@]})) || return 0
  if [ "$(id -u)" != 0 ]; then
    echo "missing: ${missing[*]}; install them with: sudo apt-get install ${missing[*]}" >&2
    return 1
  fi
  echo "installing ${missing[*]} ..." >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
}

# rust_need COMPONENT ... — adds rustup components that are missing.
rust_need() {
  local c
  for c in "$@"; do
    rustup component list --installed 2>/dev/null | grep -q "^$c-" || rustup component add "$c"
  done
}
