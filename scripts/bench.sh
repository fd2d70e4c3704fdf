#!/usr/bin/env bash
# The end-to-end benchmark: the simulator (fixed seed) and tansu (memory storage) on this
# machine, `ibstream run` (at-least-once) until every backfill is complete (read from /status),
# reporting records/s, the connector's CPU microseconds per record (from /proc), peak RSS, CRM
# requests and bytes produced. `--smoke`: a tiny workload, to check it runs.
#
# Needs tansu 0.6.0 (./scripts/test.sh installs it) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked --bin ibstream
exec python3 scripts/bench.py target/release/ibstream "$@"
