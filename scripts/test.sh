#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs the real SIP peers
# (SIPp, sipsak) from Debian, the Python dependencies into .venv, then lints
# and runs every unit and integration test. Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

if ! command -v sipp >/dev/null 2>&1 || ! command -v sipsak >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  echo "installing SIPp and sipsak (Debian packages sip-tester, sipsak)..."
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq sip-tester sipsak >/dev/null
fi

source "$ROOT/scripts/env.sh"

echo "ruff check..."
ruff check .
echo "pytest..."
exec python -m pytest -q -p no:cacheprovider "$@"
