#!/usr/bin/env bash
# Install nginx for the benchmark's nginx column, when it is missing and we are root.
# The distribution's nginx service is kept from starting (it would listen on port 80):
# the benchmark runs its own nginx, on 127.0.0.1 only, from a generated config.
set -u
if command -v nginx >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "bench: nginx is not installed (and this is not root with apt-get): the nginx column will be absent"
    exit 0
fi
echo "bench: installing nginx with apt-get"
created=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    created=1
fi
export DEBIAN_FRONTEND=noninteractive
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends nginx >/dev/null; }; then
    echo "bench: nginx could not be installed: the nginx column will be absent"
fi
if [ -n "$created" ]; then
    rm -f /usr/sbin/policy-rc.d
fi
exit 0
