# Sourced by image/build: the Debian arm64 root with systemd, made once with debootstrap
# and qemu-user-static and cached outside the work tree, keyed by everything that decides
# its content (suite, mirror, package list, this file's recipe version). Later builds unpack
# the cached tarball; nothing in it is site- or board-specific, and it holds no key.

ROOT_SUITE=bookworm
ROOT_MIRROR=${WARDGATE_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# systemd (PID 1, networkd for DHCP, journald), udev (device units for the mounts),
# nftables (nft for the health check and for the engineer), the libraries wardgate links,
# kmod (nf_tables modules on demand), iproute2 (ip, for the engineer), qemu-guest-agent
# (the tests' way into the guest under QEMU; it starts only where QEMU offers its port, so
# never on a board).
ROOT_PACKAGES=systemd,systemd-sysv,udev,nftables,libnftnl11,libmnl0,kmod,iproute2,qemu-guest-agent
ROOT_RECIPE=1

root_cache_dir() {
  echo "${WARDGATE_IMAGE_CACHE:-/var/cache/wardgate-image}"
}

# Prints the path of the cached root tarball, making it first if needed.
root_tarball() {
  local cache key tar work
  cache=$(root_cache_dir)
  key=$(printf '%s\n' "$ROOT_SUITE" "$ROOT_MIRROR" "$ROOT_PACKAGES" "$ROOT_RECIPE" | sha256sum | cut -c1-16)
  tar="$cache/root-$ROOT_SUITE-arm64-$key.tar"
  if [ -s "$tar" ]; then
    echo "$tar"
    return 0
  fi
  mkdir -p "$cache"
  work=$(mktemp -d "$cache/root-work.XXXXXX")
  echo "image: debootstrap $ROOT_SUITE arm64 (first build; cached as $tar) ..." >&2
  binfmt_enable
  debootstrap --foreign --arch=arm64 --variant=minbase --include="$ROOT_PACKAGES" \
    "$ROOT_SUITE" "$work" "$ROOT_MIRROR" >&2
  # The kernel runs the arm64 binaries through qemu-user-static, found at the binfmt
  # interpreter's path inside the chroot.
  install -D -m 0755 /usr/bin/qemu-aarch64-static "$work/usr/bin/qemu-aarch64-static"
  mkdir -p "$work/usr/libexec/qemu-binfmt"
  ln -sf ../../bin/qemu-aarch64-static "$work/usr/libexec/qemu-binfmt/aarch64-binfmt-P"
  chroot "$work" /debootstrap/debootstrap --second-stage >&2
  chroot "$work" apt-get clean
  rm -rf "$work/usr/libexec/qemu-binfmt" "$work/usr/bin/qemu-aarch64-static" \
    "$work"/var/lib/apt/lists/* "$work"/var/cache/apt/* "$work"/var/log/*
  tar -C "$work" --numeric-owner -cf "$tar.part" .
  mv "$tar.part" "$tar"
  rm -rf "$work"
  echo "$tar"
}

binfmt_enable() {
  [ -e /proc/sys/fs/binfmt_misc/register ] ||
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
  grep -q enabled /proc/sys/fs/binfmt_misc/qemu-aarch64 || {
    echo "image: qemu-aarch64 binfmt not enabled (apt-get install qemu-user-static binfmt-support)" >&2
    return 1
  }
}
