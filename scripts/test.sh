#!/usr/bin/env bash
# Installs what the tests need, then runs the whole test suite. CI runs this (.ci/run).
#
# Needs: a Rust toolchain (cargo), gcc/make for librdkafka, libssl-dev, python3 with pip.
# Installs: tansu 0.6.0 (a Kafka-protocol broker) into ~/.cargo/bin, and fastavro (the
# independent Avro implementation the interoperability test decodes with), when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

TANSU_VERSION=0.6.0
export PATH="$HOME/.cargo/bin:$PATH"

if ! tansu --version 2>/dev/null | grep -qx "tansu $TANSU_VERSION"; then
  echo "==> installing tansu $TANSU_VERSION (once per machine, about 8 minutes)"
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql
fi
echo "==> $(tansu --version)"

FASTAVRO_VERSION=1.13.1
if ! python3 -c "import fastavro, sys; sys.exit(fastavro.__version__ != '$FASTAVRO_VERSION')" 2>/dev/null; then
  echo "==> installing fastavro $FASTAVRO_VERSION"
  python3 -m pip install --quiet --disable-pip-version-check "fastavro==$FASTAVRO_VERSION"
fi
echo "==> fastavro $(python3 -c 'import fastavro; print(fastavro.__version__)')"

# --all-targets also builds the benchmarks and runs each once, so they cannot rot.
echo "==> cargo test"
cargo test --locked --all-targets "$@"
