# Sourced by image/build: the environment for cross-compiling the workspace to aarch64
# (Debian's gcc-aarch64-linux-gnu, arm64 libnftnl/libmnl by multiarch, found by pkg-config).
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
# Target-specific, so that host build scripts still find the host's libraries.
export PKG_CONFIG_ALLOW_CROSS_aarch64_unknown_linux_gnu=1
export PKG_CONFIG_LIBDIR_aarch64_unknown_linux_gnu=/usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig
export CARGO_PROFILE_RELEASE_STRIP=symbols
