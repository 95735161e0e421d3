#!/usr/bin/env bash
# Measures llmtrace-rotator next to OpenBao's database engine, on this machine, with servers it
# starts itself on loopback, and prints one markdown table.
#
#   scripts/bench.sh [--quick]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The same prerequisites as the tests (PostgreSQL, Redis, OpenBao), installed if missing.
ROTATOR_TEST_INSTALL_ONLY=1 bash scripts/test.sh
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
export PATH="$pg_bin:$PATH:$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"

cargo build --release --quiet
ROTATOR_BIN="$PWD/target/release/llmtrace-rotator" cargo bench --quiet --bench rotation -- "$@"
