#!/usr/bin/env bash
# Installs siphon (once) and runs a node on the embedded log with the example config.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec siphon run -c "${1:-examples/siphon.yaml}"
