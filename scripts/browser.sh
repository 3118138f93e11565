#!/usr/bin/env bash
# A real browser for the console's tests: Debian's chromium and
# chromium-driver (chromedriver, the WebDriver server).
#
#   scripts/browser.sh install    install both if missing
set -euo pipefail

log() { printf '[browser] %s\n' "$*" >&2; }

case "${1:-}" in
  install)
    if command -v chromedriver >/dev/null && command -v chromium >/dev/null; then
      exit 0
    fi
    # Keep maintainer scripts from starting anything.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
      chmod +x /usr/sbin/policy-rc.d
    fi
    log "apt-get update"
    apt-get update -qq
    log "installing: chromium chromium-driver"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium chromium-driver >/dev/null
    ;;
  *)
    echo "usage: scripts/browser.sh install" >&2
    exit 2
    ;;
esac
