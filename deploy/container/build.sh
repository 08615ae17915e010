#!/usr/bin/env bash
# Builds the container images of edge-agent and cloud-hub from binaries cargo already built:
#
#   deploy/container/build.sh [--profile release|debug] [--tag TAG] [--program edge-agent|cloud-hub]
#                             [--storage-root DIR] [--staging DIR] [--no-strip]
#
# Each image is FROM scratch and holds only what the binary needs, staged here into DIR/<program>/rootfs/:
#   /usr/bin/<program>        the binary (debug info stripped, symbols kept, unless --no-strip)
#   every library `ldd` lists, at the path the binary asks for it, the dynamic loader included
#   /etc/passwd, /etc/group   one line each for meshbridge, uid/gid 10001 (the image's USER)
#   /var/lib/meshbridge/      empty, owned by 10001 in the image (a new named volume takes its ownership)
# then `podman build --format docker` (the OCI format has no HEALTHCHECK) tags meshbridge/<program>:TAG.
#
# Nothing is compiled here: build first (`cargo build --release --bins`, or the debug build the tests use).
# The binaries are read from $CARGO_TARGET_DIR/<profile>/ (default target/). No musl toolchain is needed:
# the glibc the binary was linked against travels with it.
#
# --storage-root DIR keeps podman's state (images, run and temp files) under DIR instead of
#   /var/lib/containers and /run: the tests build into a throwaway directory with it. Without it the images
#   land in podman's default store, where `podman run` finds them.
# --staging DIR keeps the staged files in DIR (the tests run the binary in it with chroot); by default they
#   go to a temporary directory removed afterwards.
# Prints one line per image: "image <name> <id> <bytes>".
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
HERE="$ROOT/deploy/container"

profile=release
tag=""
programs=(edge-agent cloud-hub)
storage_root=""
staging=""
strip_debug=1

usage() { sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2; exit 2; }

while (($# > 0)); do
    case "$1" in
        --profile) profile="${2:?--profile needs release or debug}"; shift 2 ;;
        --tag) tag="${2:?--tag needs a value}"; shift 2 ;;
        --program) programs=("${2:?--program needs edge-agent or cloud-hub}"); shift 2 ;;
        --storage-root) storage_root="${2:?--storage-root needs a directory}"; shift 2 ;;
        --staging) staging="${2:?--staging needs a directory}"; shift 2 ;;
        --no-strip) strip_debug=0; shift ;;
        -h|--help) usage ;;
        *) echo "build.sh: unknown argument $1" >&2; usage ;;
    esac
done
case "$profile" in release|debug) ;; *) echo "build.sh: --profile is release or debug, not $profile" >&2; exit 2 ;; esac
for program in "${programs[@]}"; do
    case "$program" in edge-agent|cloud-hub) ;; *) echo "build.sh: unknown program $program" >&2; exit 2 ;; esac
done

version="$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$ROOT/Cargo.toml")"
revision="$(git -C "$ROOT" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)"
tag="${tag:-$version}"
target_dir="${CARGO_TARGET_DIR:-$ROOT/target}"
case "$target_dir" in /*) ;; *) target_dir="$ROOT/$target_dir" ;; esac

command -v podman >/dev/null 2>&1 || {
    echo "build.sh: podman is not installed (Debian: apt-get install --no-install-recommends podman)" >&2
    exit 1
}

podman_args=()
if [[ -n "$storage_root" ]]; then
    mkdir -p "$storage_root"
    storage_root="$(cd "$storage_root" && pwd)"
    # --root/--runroot: images and layers, locks and run state; --tmpdir: libpod's own state, otherwise
    # /run/libpod. Everything a throwaway build keeps stays under DIR, except containers/image's blob-info
    # cache (/var/lib/containers/cache/blob-info-cache-v1.boltdb), which podman 4.3 writes for root with
    # no option to move it: a small cache of digests, no images.
    podman_args+=(--root "$storage_root/storage" --runroot "$storage_root/run" --tmpdir "$storage_root/tmp")
    # vfs: layers are plain directories. overlay works on this project's machines too, but it needs kernel
    # overlay mounts, which nested or unprivileged sandboxes often refuse and which a killed test would
    # leave mounted; these images are one layer, so vfs costs one copy. (Not forced on the default store:
    # podman refuses a driver other than the one that store was made with.)
    podman_args+=(--storage-driver vfs)
fi
# file events and cgroupfs: already podman's choice where no systemd runs (as here), pinned so a machine
# with systemd does not write to its journal or ask it for cgroups. A build FROM scratch with only COPY
# starts no container: no OCI runtime and no cgroup are involved, which is why it works in a sandbox where
# `podman run` does not.
podman_args+=(--events-backend file --cgroup-manager cgroupfs)

if [[ -n "$staging" ]]; then
    mkdir -p "$staging"
    staging="$(cd "$staging" && pwd)"
else
    staging="$(mktemp -d)"
    trap 'rm -rf "$staging"' EXIT
fi

# stage PROGRAM BINARY DIR: the image's filesystem in DIR/rootfs, and the Containerfile in DIR.
stage() {
    local program="$1" binary="$2" dir="$3"
    local rootfs="$dir/rootfs"
    rm -rf "$dir"
    # var/lib exists in rootfs/ so that the second COPY creates only /var/lib/meshbridge (buildah would
    # give the parents it creates the --chown owner too).
    mkdir -p "$rootfs/usr/bin" "$rootfs/etc" "$rootfs/var/lib" "$dir/data"
    if ((strip_debug)); then
        strip --strip-debug -o "$rootfs/usr/bin/$program" "$binary"
    else
        cp "$binary" "$rootfs/usr/bin/$program"
    fi
    chmod 0755 "$rootfs/usr/bin/$program"
    # ldd's lines: "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", the loader as
    # "/lib64/ld-linux-x86-64.so.2 (0x...)", and the kernel's vDSO without a path (not a file).
    local lib
    while read -r lib; do
        [[ -n "$lib" ]] || continue
        mkdir -p "$rootfs$(dirname "$lib")"
        # -L: the file behind the symlink, under the name the binary asks for.
        cp -L "$lib" "$rootfs$lib"
    done < <(ldd "$binary" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }')
    if ldd "$binary" | grep -q "not found"; then
        echo "build.sh: $binary needs a library that is not installed:" >&2
        ldd "$binary" | grep "not found" >&2
        exit 1
    fi
    printf 'meshbridge:x:10001:10001:meshbridge:/var/lib/meshbridge:/sbin/nologin\n' >"$rootfs/etc/passwd"
    printf 'meshbridge:x:10001:\n' >"$rootfs/etc/group"
    chmod 0644 "$rootfs/etc/passwd" "$rootfs/etc/group"
    # DIR/data is the data directory's contents (none): the Containerfile copies it to /var/lib/meshbridge
    # with --chown=10001:10001 (COPY makes everything else root-owned, whatever the staged owner).
    cp "$HERE/Containerfile.$program" "$dir/Containerfile"
}

created="$(date -u +%Y-%m-%dT%H:%M:%SZ)"
for program in "${programs[@]}"; do
    binary="$target_dir/$profile/$program"
    if [[ ! -x "$binary" ]]; then
        flag=""; [[ "$profile" == release ]] && flag=" --release"
        echo "build.sh: $binary is missing: run \`cargo build$flag --bins\` first (same CARGO_TARGET_DIR)" >&2
        exit 1
    fi
    dir="$staging/$program"
    stage "$program" "$binary" "$dir"
    image="meshbridge/$program:$tag"
    # --layers=false: one layer and no intermediate images (vfs stores every image as a full copy).
    # --format docker: keeps HEALTHCHECK. --pull=never: FROM scratch needs no registry.
    podman "${podman_args[@]}" build --quiet --layers=false --format docker --pull=never \
        --build-arg "VERSION=$version" --build-arg "REVISION=$revision" --build-arg "CREATED=$created" \
        --file "$dir/Containerfile" --tag "$image" "$dir" >/dev/null
    podman "${podman_args[@]}" image inspect --format "image $image {{.Id}} {{.Size}}" "$image"
done
