#!/usr/bin/env bash
# The end-to-end benchmark: the simulator (fixed seed) and tansu (memory storage) on this
# machine, `ibstream run` (at-least-once) until every backfill is complete (read from /status),
# reporting records/s, the connector's CPU microseconds per record (from /proc), peak RSS, CRM
# requests and bytes produced; then the same workload through the baseline
# (benches/baseline/poller.py), checking both emit the same events per stream, and the ratio.
# `--smoke`: a tiny workload, to check it runs.
#
# Needs tansu 0.6.0 (./scripts/test.sh installs it) and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
cargo build --release --locked --bin ibstream
# The baseline's tools, pinned, in a virtual environment of their own.
VENV="$PWD/target/bench-venv"
TOOLS="fastavro==1.13.1 confluent-kafka==2.16.1 requests==2.34.2"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $TOOLS
exec python3 scripts/bench.py target/release/ibstream "$VENV/bin/python" "$@"
