#!/usr/bin/env bash
# Installs what the tests need, then runs the whole test suite. CI runs this (.ci/run).
#
# Needs: a Rust toolchain (cargo), gcc/make for librdkafka, libssl-dev.
# Installs: tansu 0.6.0 (a Kafka-protocol broker) into ~/.cargo/bin when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

TANSU_VERSION=0.6.0
export PATH="$HOME/.cargo/bin:$PATH"

if ! tansu --version 2>/dev/null | grep -qx "tansu $TANSU_VERSION"; then
  echo "==> installing tansu $TANSU_VERSION (once per machine, about 8 minutes)"
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql
fi
echo "==> $(tansu --version)"

# --all-targets also builds the benchmarks and runs each once, so they cannot rot.
echo "==> cargo test"
cargo test --locked --all-targets "$@"
