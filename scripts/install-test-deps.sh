#!/usr/bin/env bash
# Installs what the tests need and is not built by cargo: Debian's Mosquitto broker (the e2e tests run it at
# the edge and at the cloud) and its command-line clients, and fiu-utils (fiu-run/fiu-ctrl make fsync fail
# under a running agent in tests/tests/fault_disk.rs), and iproute2 (ip netns, veth and tc for the slow link of
# tests/tests/fault_slow.rs), and podman (tests/tests/images.rs builds the container images with it; no
# container is run), and PyPI's kubernetes-validate (tests/tests/k8s_manifests.rs checks deploy/k8s with
# it), and systemd (only for systemd-analyze, which tests/tests/packages.rs runs on the Debian packages'
# units; no systemd runs as PID 1) with dpkg-dev (dpkg-shlibdeps computes the packages' Depends). Does nothing
# when they are already there.
set -euo pipefail

PACKAGES=(mosquitto mosquitto-clients fiu-utils iproute2 podman systemd dpkg-dev)
# Pinned: a new release may bring new schemas and stricter checks; move it on purpose.
KUBERNETES_VALIDATE=kubernetes-validate==1.37.0

have() { command -v "$1" >/dev/null 2>&1 || [[ -x "/usr/sbin/$1" ]]; }

missing=()
have mosquitto || missing+=(mosquitto)
have mosquitto_pub || missing+=(mosquitto-clients)
have fiu-run || missing+=(fiu-utils)
have tc || missing+=(iproute2)
have podman || missing+=(podman)
[[ -x /usr/bin/systemd-analyze ]] || missing+=(systemd)
have dpkg-shlibdeps || missing+=(dpkg-dev)

if ((${#missing[@]} > 0)); then
    if [[ $(id -u) -eq 0 ]]; then
        SUDO=()
    elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        echo "install-test-deps: cannot install ${missing[*]} (not root and no password-less sudo)." >&2
        echo "install-test-deps: run: sudo apt-get install ${PACKAGES[*]}" >&2
        echo "install-test-deps: the tests that need them will be skipped until then (and fail under CI=true)." >&2
        exit 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "install-test-deps: no apt-get here; install ${PACKAGES[*]} with your package manager." >&2
        exit 0
    fi
    echo "install-test-deps: installing ${missing[*]}"
    "${SUDO[@]}" apt-get update -qq
    "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
    # The package starts a system broker on port 1883 where an init system runs; the tests start their own
    # brokers on ephemeral ports, and the local mesh needs 1883 free.
    "${SUDO[@]}" service mosquitto stop >/dev/null 2>&1 || true
fi
# Run as `python3 -m kubernetes_validate` by the test, so it need not be on PATH (pyenv shims, ~/.local/bin).
if ! python3 -m kubernetes_validate --version 2>/dev/null | grep -qx "${KUBERNETES_VALIDATE#*==}"; then
    if python3 -m pip --version >/dev/null 2>&1; then
        echo "install-test-deps: installing $KUBERNETES_VALIDATE"
        python3 -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "$KUBERNETES_VALIDATE" ||
            echo "install-test-deps: pip could not install $KUBERNETES_VALIDATE; tests/tests/k8s_manifests.rs will be skipped (and fail under CI=true)." >&2
    else
        echo "install-test-deps: no pip here; run: python3 -m pip install $KUBERNETES_VALIDATE" >&2
        echo "install-test-deps: tests/tests/k8s_manifests.rs will be skipped until then (and fail under CI=true)." >&2
    fi
fi
echo "install-test-deps: mosquitto $( (mosquitto -h 2>/dev/null || /usr/sbin/mosquitto -h 2>/dev/null || true) | head -1 | sed 's/^mosquitto //')"
