# Sourced by the scripts that install Debian packages (registry-servers.sh,
# prometheus-check.sh, browser.sh): one `apt_install`, which runs
# `apt-get update` once per script run and keeps maintainer scripts from
# starting packaged daemons (on ports the tests use). Needs a `log` function.

APT_UPDATED=0
apt_install() {
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
  fi
  if [ "$APT_UPDATED" = 0 ]; then
    log "apt-get update"
    apt-get update -qq
    APT_UPDATED=1
  fi
  log "installing: $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
