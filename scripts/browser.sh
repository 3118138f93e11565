#!/usr/bin/env bash
# A real browser for the console's tests: Debian's chromium and
# chromium-driver (chromedriver, the WebDriver server).
#
#   scripts/browser.sh install    install both if missing
set -euo pipefail

log() { printf '[browser] %s\n' "$*" >&2; }
# shellcheck source=apt-lib.sh
. "$(dirname "$0")/apt-lib.sh"

case "${1:-}" in
  install)
    if command -v chromedriver >/dev/null && command -v chromium >/dev/null; then
      exit 0
    fi
    apt_install chromium chromium-driver
    ;;
  *)
    echo "usage: scripts/browser.sh install" >&2
    exit 2
    ;;
esac
