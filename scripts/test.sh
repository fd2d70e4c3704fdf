#!/usr/bin/env bash
# Installs what the tests need, then runs the whole test suite. CI runs this (.ci/run).
#
# Needs: a Rust toolchain (cargo), gcc/make for librdkafka, libssl-dev, python3 with venv.
# Installs: tansu 0.6.0 (a Kafka-protocol broker) into ~/.cargo/bin, and fastavro (the
# independent Avro implementation the interoperability test decodes with) and
# prometheus_client (whose parser reads the /metrics text in the operations test) into a
# virtual environment of its own under target/ (Debian's system pip refuses installs, PEP 668).
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
PROMETHEUS_CLIENT_VERSION=0.21.1
VENV="$PWD/target/test-venv"
if ! "$VENV/bin/python" -c "import fastavro, prometheus_client, sys; from importlib.metadata import version; sys.exit(fastavro.__version__ != '$FASTAVRO_VERSION' or version('prometheus_client') != '$PROMETHEUS_CLIENT_VERSION')" 2>/dev/null; then
  echo "==> installing fastavro $FASTAVRO_VERSION and prometheus_client $PROMETHEUS_CLIENT_VERSION into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "fastavro==$FASTAVRO_VERSION" "prometheus_client==$PROMETHEUS_CLIENT_VERSION"
fi
echo "==> fastavro $("$VENV/bin/python" -c 'import fastavro; print(fastavro.__version__)'), prometheus_client $PROMETHEUS_CLIENT_VERSION"
# The interoperability tests run this interpreter (not an IBSTREAM_ variable: those are
# configuration keys, and an unknown one is an error).
export INTEROP_PYTHON="$VENV/bin/python"

# --all-targets also builds the benchmarks and runs each once, so they cannot rot.
echo "==> cargo test"
cargo test --locked --all-targets "$@"
