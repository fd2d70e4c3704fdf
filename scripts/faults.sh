#!/usr/bin/env bash
# The fault suite (tests/pipeline/faults.rs): kill -9 at random moments, SIGTERM at every
# phase, the CRM down and back, the CRM at its worst, a 403 mid-run, the broker killed 30 s,
# the secrets sweep; each scenario ends by checking every topic against the simulator's
# truth (in exactly-once: zero duplicates of any kind under read_committed, and after the
# kills a read_uncommitted consumer must see records of aborted transactions). Prints the
# figures of each scenario (lines starting with "faults:").
#
#   scripts/faults.sh                 bounded form on Apache Kafka, at-least-once (what
#                                     `cargo test` runs; ~5 minutes)
#   scripts/faults.sh --exactly-once  the same with delivery = "exactly-once" (the test
#                                     command runs this too; ~5 minutes)
#   scripts/faults.sh --long          20 kills and three times the data
#   scripts/faults.sh --broker tansu  against tansu (no transactions: not with --exactly-once)
#   scripts/faults.sh --kafka H:P     against a broker this suite did not start, e.g. the
#                                     docker-compose Kafka (localhost:9092); the broker-kill
#                                     scenario is skipped
#
# Apache Kafka is the broker of tests/kafka/pom.xml in target/kafka/libs and tansu 0.6.0 in
# ~/.cargo/bin (./scripts/test.sh installs both).
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$HOME/.cargo/bin:$PATH"
usage="usage: scripts/faults.sh [--long] [--exactly-once] [--broker apache|tansu | --kafka HOST:PORT]"
while [ $# -gt 0 ]; do
  case "$1" in
    --long) export FAULTS_LONG=1 ;;
    --broker)
      case "${2:-}" in
        apache|tansu) export FAULTS_BROKER="$2" ;;
        *) echo "$usage" >&2; exit 2 ;;
      esac
      shift ;;
    --kafka) [ -n "${2:-}" ] || { echo "$usage" >&2; exit 2; }; export FAULTS_KAFKA="$2"; shift ;;
    --exactly-once) export FAULTS_DELIVERY=exactly-once ;;
    *) echo "$usage" >&2; exit 2 ;;
  esac
  shift
done
if [ "${FAULTS_BROKER:-}" = tansu ] && [ "${FAULTS_DELIVERY:-}" = exactly-once ]; then
  echo "tansu has no transactions: --exactly-once needs Apache Kafka (or --kafka)" >&2
  exit 2
fi
log="target/faults${FAULTS_DELIVERY:+-$FAULTS_DELIVERY}.log"
mkdir -p target
cargo test --locked --test pipeline faults:: -- --nocapture 2>&1 | tee "$log" \
  | grep -E '^(faults:|test |test result)'
grep -q '^test result: ok' "$log"
