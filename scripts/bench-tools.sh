#!/usr/bin/env bash
# Install what `physarum bench` drives: Debian's nginx-light (or nginx where the
# light package is gone) and wrk. Idempotent: does nothing when both are present.
# A system nginx the package starts on port 80 is stopped again (the bench runs its
# own, under a temporary directory).
set -euo pipefail
PATH=$PATH:/usr/sbin
need=()
command -v nginx >/dev/null || need+=(nginx-light)
command -v wrk >/dev/null || need+=(wrk)
((${#need[@]})) || exit 0
sudo=""
[[ $(id -u) -eq 0 ]] || sudo=sudo
command -v apt-get >/dev/null || { echo "bench-tools: no apt-get to install ${need[*]}" >&2; exit 1; }
export DEBIAN_FRONTEND=noninteractive
had_pid=0
[[ -e /run/nginx.pid ]] && had_pid=1
if ! $sudo apt-get install -y -q "${need[@]}"; then
    $sudo apt-get update -q || true
    if ! $sudo apt-get install -y -q "${need[@]}"; then
        $sudo apt-get install -y -q "${need[@]/nginx-light/nginx}"
    fi
fi
if ((!had_pid)) && [[ -s /run/nginx.pid ]]; then
    $sudo kill -QUIT "$(cat /run/nginx.pid)" 2>/dev/null || true
fi
