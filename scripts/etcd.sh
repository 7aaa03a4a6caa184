#!/usr/bin/env bash
# Install what the etcd-backed registry needs, when it is missing (idempotent):
# - `etcd` and `etcdctl` (Debian's etcd-server, the v3 API), which the HA tests
#   start as their own 3-member clusters on loopback;
# - `protoc` and protobuf's well-known .proto files (Debian's protobuf-compiler and
#   libprotobuf-dev), which the etcd client crate needs to build its gRPC stubs
#   (only with `--features etcd`).
# Usage: scripts/etcd.sh   (as root, or with sudo available)
set -euo pipefail

missing=()
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
[ -e /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
if [ ${#missing[@]} -eq 0 ]; then
    echo "etcd.sh: etcd, etcdctl, protoc and the protobuf includes are installed"
    exit 0
fi

sudo=
[ "$(id -u)" -eq 0 ] || sudo=sudo
echo "etcd.sh: installing ${missing[*]}"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
# Debian's package starts a system etcd on the default ports; the tests start
# their own, so stop that one when systemd runs it (no-op in containers).
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
    $sudo systemctl disable --now etcd || true
fi
etcd --version | head -1
protoc --version
