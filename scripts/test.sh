#!/usr/bin/env bash
# Installs what the tests need, then runs the whole test suite. CI runs this (.ci/run).
#
# Needs: a Rust toolchain (cargo), gcc/make, python3 with venv, Java 17 and Maven.
# Installs: what the build lacks of libssl-dev, pkg-config and chromium (with apt-get, as root), Apache
# Kafka (the broker of tests/kafka/pom.xml, from Maven Central) into target/kafka/libs, tansu
# 0.6.0 (a second Kafka-protocol broker with quirks of its own) into ~/.cargo/bin, and the
# tests' Python tools (below) into a virtual environment of its own under target/ (Debian's
# system pip refuses installs, PEP 668).
set -euo pipefail
cd "$(dirname "$0")/.."

# rdkafka's `ssl` feature builds against OpenSSL, found by pkg-config; Chromium renders the
# status page headless (tests/pipeline/newcomer.rs).
missing=""
for package in libssl-dev pkg-config chromium; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing="$missing $package"
done
if [ -n "$missing" ]; then
  echo "==> installing$missing"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  # shellcheck disable=SC2086
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing
fi

# Apache Kafka, the version tests/kafka/pom.xml pins (docker-compose.yml runs the same).
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' tests/kafka/pom.xml)
if [ ! -f "target/kafka/libs/kafka_2.13-$KAFKA_VERSION.jar" ]; then
  echo "==> fetching Apache Kafka $KAFKA_VERSION with Maven into target/kafka/libs"
  rm -rf target/kafka/libs
  mvn -q -B -f tests/kafka/pom.xml dependency:copy-dependencies \
    -DoutputDirectory="$PWD/target/kafka/libs"
fi
echo "==> Apache Kafka $KAFKA_VERSION ($(java -version 2>&1 | head -1))"

# The JVM consumer of tests/jvm_consumer.rs (kafka-clients + Avro Java), built into
# target/interop-jvm when its sources changed.
JVM_CONSUMER=target/interop-jvm/interop-jvm.jar
if [ ! -f "$JVM_CONSUMER" ] || [ -n "$(find tests/interop/jvm -newer "$JVM_CONSUMER" -type f | head -1)" ]; then
  echo "==> building the JVM consumer (tests/interop/jvm) with Maven into target/interop-jvm"
  rm -rf target/interop-jvm # no jar of an older pom left in lib/
  mvn -q -B -f tests/interop/jvm/pom.xml package
fi

TANSU_VERSION=0.6.0
export PATH="$HOME/.cargo/bin:$PATH"

if ! tansu --version 2>/dev/null | grep -qx "tansu $TANSU_VERSION"; then
  echo "==> installing tansu $TANSU_VERSION (once per machine, about 8 minutes)"
  cargo install tansu --version "$TANSU_VERSION" --locked --features dynostore,libsql
fi
echo "==> $(tansu --version)"

# Python tools of the tests, pinned: fastavro (an independent Avro implementation),
# prometheus_client (its parser reads /metrics), pyyaml + jsonschema (docker-compose.yml
# against the Compose Specification's schema), helm-python-sdk (Helm's own engine and linter,
# no helm binary) and yamllint (the rendered chart).
PYTHON_TOOLS="fastavro==1.13.1 prometheus_client==0.21.1 PyYAML==6.0.4 jsonschema==4.26.0 helm-python-sdk==0.2.2 yamllint==1.38.0"
VENV="$PWD/target/test-venv"
if ! "$VENV/bin/python" - "$PYTHON_TOOLS" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
for pin in sys.argv[1].split():
    name, want = pin.split("==")
    if version(name) != want:
        sys.exit(1)
PY
then
  echo "==> installing $PYTHON_TOOLS into $VENV"
  python3 -m venv "$VENV"
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check $PYTHON_TOOLS
fi
echo "==> python tools: $PYTHON_TOOLS"
# The interoperability tests run this interpreter (not an IBSTREAM_ variable: those are
# configuration keys, and an unknown one is an error).
export INTEROP_PYTHON="$VENV/bin/python"

# --all-targets also builds the benchmarks and runs each once, so they cannot rot.
echo "==> cargo test"
cargo test --locked --all-targets "$@"
# A test artifact: the status page as headless Chromium drew it.
echo "==> status page screenshot: target/test-artifacts/status-page.png"

# cargo test ran the fault suite at-least-once; its exactly-once form (bounded), on Apache
# Kafka too: zero duplicates under read_committed through kill -9 and a broker kill.
echo "==> scripts/faults.sh --exactly-once"
./scripts/faults.sh --exactly-once

# The end-to-end benchmark on a tiny workload: both sides run and emit the same events.
echo "==> scripts/bench.sh --smoke"
./scripts/bench.sh --smoke
