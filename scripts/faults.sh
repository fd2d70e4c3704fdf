#!/usr/bin/env bash
# The fault suite (tests/pipeline/faults.rs): kill -9 at random moments, SIGTERM at every
# phase, the CRM down and back, the CRM at its worst, a 403 mid-run, the broker stopped 30 s;
# each scenario ends by checking every topic against the simulator's truth. Prints the
# figures of each scenario (lines starting with "faults:").
#
#   scripts/faults.sh                 bounded form (what the test command runs; ~4 minutes)
#   scripts/faults.sh --long          20 kills and three times the data
#   scripts/faults.sh --kafka H:P     against another broker, e.g. the docker-compose Kafka
#                                     (localhost:9092); the broker-stop scenario is skipped
#   scripts/faults.sh --kafka H:P --exactly-once
#                                     the same with delivery = "exactly-once" (needs a broker
#                                     with transactions: Apache Kafka, not tansu)
#
# Needs tansu 0.6.0 unless --kafka is given (./scripts/test.sh installs it).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
while [ $# -gt 0 ]; do
  case "$1" in
    --long) export FAULTS_LONG=1 ;;
    --kafka) export FAULTS_KAFKA="$2"; shift ;;
    --exactly-once) export FAULTS_DELIVERY=exactly-once ;;
    *) echo "usage: scripts/faults.sh [--long] [--kafka HOST:PORT [--exactly-once]]" >&2; exit 2 ;;
  esac
  shift
done
cargo test --locked --test pipeline faults:: -- --nocapture 2>&1 | tee target/faults.log \
  | grep -E '^(faults:|test |test result)'
grep -q '^test result: ok' target/faults.log
