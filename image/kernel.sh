# Sourced by image/build: Debian's arm64 kernel (linux-image-*-arm64, the version
# linux-image-arm64 depends on now) and busybox-static for the initramfs, downloaded by
# multiarch apt into the image cache and unpacked there once per package version.

# Prints the directory holding the unpacked kernel package (boot/vmlinuz-*, lib/modules/*).
kernel_dir() {
  local cache pkg dir
  cache=$(root_cache_dir)
  pkg=$(apt-cache depends linux-image-arm64:arm64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[^:]*\):arm64$/\1/p' | head -1)
  [ -n "$pkg" ] || { echo "image: no linux-image-arm64:arm64 (dpkg --add-architecture arm64; apt-get update)" >&2; return 1; }
  dir=$(unpacked "$cache" "$pkg:arm64")
  echo "$dir"
}

busybox_dir() {
  unpacked "$(root_cache_dir)" busybox-static:arm64
}

# unpacked CACHE PACKAGE: the package's current candidate, downloaded and unpacked once.
unpacked() {
  local cache=$1 pkg=$2 ver dir deb
  ver=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p')
  [ -n "$ver" ] && [ "$ver" != "(none)" ] || { echo "image: no candidate for $pkg" >&2; return 1; }
  dir="$cache/pkg/${pkg%%:*}_${ver//:/%}"
  if [ ! -e "$dir/.done" ]; then
    rm -rf "$dir" && mkdir -p "$dir"
    (cd "$dir" && apt-get download -q "$pkg=$ver" >&2)
    deb=$(ls "$dir"/*.deb)
    dpkg-deb -x "$deb" "$dir/x"
    rm -f "$deb"
    touch "$dir/.done"
  fi
  echo "$dir/x"
}
