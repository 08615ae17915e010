#!/usr/bin/env bash
# Builds the Debian packages meshbridge-edge-agent and meshbridge-cloud-hub from the workspace's binaries:
#
#   deploy/debian/build.sh [--profile release|debug] [--out DIR] [--bin-dir DIR]
#
# --profile   which cargo profile's binaries to package (default release); built with cargo first unless
#             --bin-dir is given. Debug packages are for tests: gzip instead of xz, so a 50 MB binary packs
#             in seconds.
# --out       where the .deb files go (default $CARGO_TARGET_DIR/debian, or target/debian).
# --bin-dir   take edge-agent and cloud-hub from DIR as they are, without running cargo (the CI test packs
#             the debug binaries it already has).
#
# Each package is a tree staged under OUT/stage/<package> and packed with `dpkg-deb --root-owner-group
# --build`: no cargo-deb or debhelper, because cargo-deb would cost every CI run the compile of a tool, and
# the packages are small enough to lay out by hand. What the packages contain:
#
#   /usr/bin/<program>                          stripped of DWARF, symbols kept (backtraces keep names)
#   /lib/systemd/system/meshbridge-<...>.service  the hardened unit (this directory)
#   /etc/meshbridge/<agent|hub>.toml.example    conffile; the real config is written at install or bootstrap
#   DEBIAN/{control,conffiles,postinst,prerm,postrm}
#
# Version: the workspace's (Cargo.toml [workspace.package]), checked against the binary's --version.
# Architecture: `dpkg --print-architecture`. Depends: the shared libraries the binary links, as
# dpkg-shlibdeps computes them from Debian's symbols files (libc6, libgcc-s1 with minimum versions), plus
# adduser for the postinst.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/deploy/debian"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
PROFILE=release
OUT=""
BIN_DIR=""

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
    exit 2
}

while (($#)); do
    case "$1" in
    --profile)
        PROFILE="${2:?--profile needs release or debug}"
        shift 2
        ;;
    --out)
        OUT="${2:?--out needs a directory}"
        shift 2
        ;;
    --bin-dir)
        BIN_DIR="${2:?--bin-dir needs a directory}"
        shift 2
        ;;
    -h | --help) usage ;;
    *)
        echo "build.sh: unknown argument $1" >&2
        usage
        ;;
    esac
done
case "$PROFILE" in
release) COMPRESS=(-Zxz) ;;
debug) COMPRESS=(-Zgzip -z6) ;;
*)
    echo "build.sh: --profile is release or debug, not '$PROFILE'" >&2
    exit 2
    ;;
esac
OUT="${OUT:-$TARGET_DIR/debian}"

for tool in dpkg-deb dpkg strip; do
    command -v "$tool" >/dev/null || {
        echo "build.sh: $tool is missing (Debian: apt-get install dpkg binutils)" >&2
        exit 1
    }
done

if [[ -z "$BIN_DIR" ]]; then
    if [[ "$PROFILE" == release ]]; then
        (cd "$ROOT" && cargo build --release -p edge-agent -p cloud-hub)
    else
        (cd "$ROOT" && cargo build -p edge-agent -p cloud-hub)
    fi
    BIN_DIR="$TARGET_DIR/$PROFILE"
fi

VERSION="$(awk '
    /^\[/ { section = $0 }
    section == "[workspace.package]" && $1 == "version" { gsub(/"/, "", $3); print $3; exit }
' "$ROOT/Cargo.toml")"
[[ -n "$VERSION" ]] || {
    echo "build.sh: no version in [workspace.package] of $ROOT/Cargo.toml" >&2
    exit 1
}
ARCH="$(dpkg --print-architecture)"

# The Depends of the shared libraries `binary` links. dpkg-shlibdeps (dpkg-dev) reads Debian's symbols
# files for minimum versions; without it, the package of each library is looked up with dpkg -S, unversioned.
shlib_depends() {
    local binary="$1"
    if command -v dpkg-shlibdeps >/dev/null; then
        local work
        work="$(mktemp -d)"
        mkdir -p "$work/debian"
        printf 'Source: meshbridge\n\nPackage: meshbridge\nArchitecture: any\n' >"$work/debian/control"
        # Its one warning here is that the binary is not under debian/<package>/; real problems still show.
        (cd "$work" && dpkg-shlibdeps -O -e "$binary" 2> >(grep -v 'should already be installed' >&2)) |
            sed -n 's/^shlibs:Depends=//p'
        rm -rf "$work"
    else
        echo "build.sh: dpkg-shlibdeps (dpkg-dev) is missing: Depends without minimum versions" >&2
        local lib path pkgs=()
        for lib in $(readelf -d "$binary" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p'); do
            path="$(ldconfig -p | awk -v l="$lib" '$1 == l { print $NF; exit }')"
            [[ -n "$path" ]] || continue
            pkgs+=("$(dpkg -S "$(readlink -f "$path")" 2>/dev/null | head -1 | cut -d: -f1)")
        done
        printf '%s\n' "${pkgs[@]}" | sort -u | grep -v '^$' | paste -sd, | sed 's/,/, /g'
    fi
}

# build PACKAGE PROGRAM UNIT EXAMPLE DESCRIPTION LONG_DESCRIPTION
build() {
    local package="$1" program="$2" unit="$3" example="$4" summary="$5" long="$6"
    local binary="$BIN_DIR/$program"
    [[ -x "$binary" ]] || {
        echo "build.sh: $binary is missing (build it, or give --bin-dir)" >&2
        exit 1
    }
    local said
    said="$("$binary" --version)"
    [[ "$said" == "$program $VERSION" ]] || {
        echo "build.sh: $binary says '$said', the workspace is $VERSION: stale binary?" >&2
        exit 1
    }

    local stage="$OUT/stage/$package"
    rm -rf "$stage"
    install -d -m 0755 "$stage/DEBIAN" "$stage/usr/bin" "$stage/lib/systemd/system" "$stage/etc/meshbridge" \
        "$stage/usr/share/doc/$package"
    strip --strip-debug --remove-section=.comment --remove-section=.note -o "$stage/usr/bin/$program" "$binary"
    chmod 0755 "$stage/usr/bin/$program"
    install -m 0644 "$HERE/$unit" "$stage/lib/systemd/system/$unit"
    install -m 0644 "$HERE/$example" "$stage/etc/meshbridge/$example"
    printf '%s\n' "/etc/meshbridge/$example" >"$stage/DEBIAN/conffiles"
    for script in postinst prerm postrm; do
        install -m 0755 "$HERE/$package/$script" "$stage/DEBIAN/$script"
    done
    printf 'Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\nUpstream-Name: meshbridge\n\nFiles: *\nCopyright: meshbridge developers\nLicense: Apache-2.0\n On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.\n' \
        >"$stage/usr/share/doc/$package/copyright"
    chmod 0644 "$stage/usr/share/doc/$package/copyright"

    local depends
    depends="$(shlib_depends "$stage/usr/bin/$program")"
    [[ "$depends" == *libc6* ]] || {
        echo "build.sh: no libc6 in the computed Depends ('$depends') of $program" >&2
        exit 1
    }
    local size
    size="$(du -sk --exclude=DEBIAN "$stage" | cut -f1)"
    cat >"$stage/DEBIAN/control" <<CONTROL
Package: $package
Version: $VERSION
Architecture: $ARCH
Maintainer: meshbridge developers
Installed-Size: $size
Depends: $depends, adduser
Section: net
Priority: optional
Description: $summary
$(printf '%s\n' "$long" | fold -s -w 78 | sed -e 's/ *$//' -e 's/^/ /')
CONTROL

    mkdir -p "$OUT"
    local deb="$OUT/${package}_${VERSION}_${ARCH}.deb"
    dpkg-deb --root-owner-group "${COMPRESS[@]}" --build "$stage" "$deb" >/dev/null
    echo "$deb"
}

build meshbridge-edge-agent edge-agent meshbridge-edge-agent.service agent.toml.example \
    "meshbridge edge agent: a site's MQTT to the cloud, store-and-forward" \
    "Serves a factory line's MQTT clients (or joins its broker), commits the messages its routes select to a durable queue before acknowledging them, and streams them to the meshbridge cloud hub over QUIC with mutual TLS. Runs as the systemd unit meshbridge-edge-agent once edge-agent bootstrap has written /etc/meshbridge/agent.toml."
build meshbridge-cloud-hub cloud-hub meshbridge-cloud-hub.service hub.toml.example \
    "meshbridge cloud hub: edge agents into the cloud broker" \
    "Accepts meshbridge edge agents over QUIC with mutual TLS, publishes their messages into the cloud MQTT broker under each site's namespace, and routes commands back down. The package makes a private CA in /etc/meshbridge/pki and runs the systemd unit meshbridge-cloud-hub."

rm -rf "$OUT/stage"
