#!/usr/bin/env bash
# The one command that runs every test on a fresh machine (the README's test command; .ci/run calls it).
# The end-to-end tests start the real cloud-hub and edge-agent binaries, so those are built first, in the
# same (debug) profile and target directory as the tests.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

bash scripts/install-test-deps.sh
cargo build --workspace --bins --locked
# Tests that skip for a missing prerequisite (never under CI=true, where they fail) list themselves here;
# cargo shows a passing test's output only with --nocapture, so the list is printed after the run.
TEST_MESHBRIDGE_SKIP_LOG="$(mktemp)"
export TEST_MESHBRIDGE_SKIP_LOG
trap 'rm -f "$TEST_MESHBRIDGE_SKIP_LOG"' EXIT
status=0
cargo test --workspace --locked "$@" || status=$?
if [[ -s "$TEST_MESHBRIDGE_SKIP_LOG" ]]; then
    echo
    echo "*** $(wc -l < "$TEST_MESHBRIDGE_SKIP_LOG") test(s) did NOT run (missing prerequisites):"
    sed 's/^/***   /' "$TEST_MESHBRIDGE_SKIP_LOG"
fi
exit "$status"
