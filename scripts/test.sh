#!/usr/bin/env bash
# The one command that runs every test on a fresh machine (the README's test command; .ci/run calls it).
# The end-to-end tests start the real cloud-hub and edge-agent binaries, so those are built first, in the
# same (debug) profile and target directory as the tests.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/install-test-deps.sh
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
