#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs the real SIP peers
# (SIPp, sipsak) from Debian, the Python dependencies into .venv, then lints
# and runs every unit and integration test. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Real peers and the Kafka toolchain, from Debian: SIPp, sipsak, Java 17 and Maven
# (Maven fetches Apache Kafka from Maven Central; scripts/kafka.sh starts it).
missing=()
command -v sipp >/dev/null 2>&1 || missing+=(sip-tester)
command -v sipsak >/dev/null 2>&1 || missing+=(sipsak)
command -v java >/dev/null 2>&1 || missing+=(openjdk-17-jre-headless)
command -v mvn >/dev/null 2>&1 || missing+=(maven)
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  echo "installing ${missing[*]} (Debian packages)..."
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

source "$ROOT/scripts/env.sh"

echo "ruff check..."
ruff check .
echo "pytest..."
exec python -m pytest -q -p no:cacheprovider "$@"
