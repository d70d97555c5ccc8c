#!/usr/bin/env bash
# Install Debian's chromium for the dashboard's browser test (tests/test_dashboard.py).
#
#   eval "$(bash .ci/chromium.sh)"      # exports MOE_SCALING_TEST_CHROMIUM
#
# Installs the distribution's `chromium` package when no chromium binary is on PATH (apt-get, as
# .ci/postgres.sh installs PostgreSQL) and prints `export MOE_SCALING_TEST_CHROMIUM=/path/to/chromium`
# on stdout; everything else goes to stderr. The test runs it headless with a fresh profile.
set -euo pipefail

log() { echo "chromium.sh: $*" >&2; }

if ! command -v chromium >/dev/null 2>&1; then
  log "installing the chromium package"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq chromium >&2
fi
echo "export MOE_SCALING_TEST_CHROMIUM=$(command -v chromium)"
