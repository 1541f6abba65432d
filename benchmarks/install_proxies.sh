#!/usr/bin/env bash
# Install nginx and HAProxy (the benchmark's reference columns, the balancer tests) when
# missing and we are root.
# The distribution's services are kept from starting (nginx would listen on port 80):
# the benchmark runs its own nginx and HAProxy, on 127.0.0.1 only, from generated configs.
set -u
missing=""
command -v nginx >/dev/null 2>&1 || missing="$missing nginx"
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing="$missing haproxy"
if [ -z "$missing" ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "make:$missing not installed (and this is not root with apt-get): the benchmark columns and tests that need them will be absent or fail"
    exit 0
fi
echo "make: installing$missing with apt-get"
created=""
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    created=1
fi
export DEBIAN_FRONTEND=noninteractive
# shellcheck disable=SC2086 # one word per package
if ! { apt-get update -qq && apt-get install -y -qq --no-install-recommends $missing >/dev/null; }; then
    echo "make:$missing could not be installed"
fi
if [ -n "$created" ]; then
    rm -f /usr/sbin/policy-rc.d
fi
exit 0
