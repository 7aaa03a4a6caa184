#!/usr/bin/env bash
# Build the image of the demo service — `hello` plus its sidecar proxy — locally,
# with no registry: a root filesystem holding the `physarum` executable, a shell,
# `sleep`, the shared libraries they link (ldd) and the loader, imported with
# `docker import`. The image is rebuilt only when the executable changed (its
# SHA-256 is a label of the image).
#
# The entrypoint /instance.sh starts `physarum hello` on $SERVICE_PORT and
# `physarum proxy "$@"` (the docker driver passes the sidecar's arguments as the
# command) and ends when either ends. The same image runs any daemon with
# `--entrypoint /physarum` (the multi-host tests do).
#
# Usage: images/build.sh [--physarum PATH] [--tag IMAGE] [--force]
#   --physarum PATH  the executable to put in (default: build it, debug profile)
#   --tag IMAGE      the image reference (default: physarum/hello:dev)
#   --force          rebuild even when the image is up to date
set -euo pipefail
cd "$(dirname "$0")/.."

physarum=""
tag="physarum/hello:dev"
force=0
while [ $# -gt 0 ]; do
    case "$1" in
        --physarum) physarum="$2"; shift 2 ;;
        --tag) tag="$2"; shift 2 ;;
        --force) force=1; shift ;;
        *) echo "usage: $0 [--physarum PATH] [--tag IMAGE] [--force]" >&2; exit 2 ;;
    esac
done

if ! docker version >/dev/null 2>&1; then
    echo "images/build.sh: no Docker engine answers: cannot build $tag" >&2
    exit 3
fi
if [ -z "$physarum" ]; then
    cargo build -q -p physarum --bin physarum
    physarum=target/debug/physarum
fi
[ -x "$physarum" ] || { echo "images/build.sh: $physarum is not an executable" >&2; exit 2; }

sum=$(sha256sum "$physarum" | cut -d' ' -f1)
if [ "$force" = 0 ] && [ "$(docker image inspect -f '{{index .Config.Labels "physarum.binary"}}' "$tag" 2>/dev/null)" = "$sum" ]; then
    echo "$tag is up to date"
    exit 0
fi

old=$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root/bin" "$root/tmp" "$root/etc"
chmod 1777 "$root/tmp"
# Debug symbols are most of a debug build: leave them out of the image.
objcopy --strip-debug "$physarum" "$root/physarum"
cp -L "$(command -v dash)" "$root/bin/sh"
cp -L "$(command -v sleep)" "$root/bin/sleep"
for exe in "$root/physarum" "$root/bin/sh" "$root/bin/sleep"; do
    # "libx.so => /path (addr)" and "/lib64/ld-linux-x86-64.so.2 (addr)"
    for lib in $(ldd "$exe" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'); do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done
done
printf 'root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n' > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
cat > "$root/instance.sh" <<'SCRIPT'
#!/bin/sh
# An instance: the demo application and its sidecar proxy (the arguments are the
# sidecar's). When either ends, so does the other, and so does the container.
/physarum hello --port "$SERVICE_PORT" &
app=$!
/physarum proxy "$@" &
proxy=$!
trap 'kill -TERM $app $proxy 2>/dev/null' TERM INT
while kill -0 $app 2>/dev/null && kill -0 $proxy 2>/dev/null; do sleep 0.2; done
kill -TERM $app $proxy 2>/dev/null
wait
exit 1
SCRIPT
chmod 755 "$root/instance.sh"

tar -C "$root" -c . | docker import \
    --change 'ENTRYPOINT ["/instance.sh"]' \
    --change "LABEL physarum.binary=$sum" \
    --change 'ENV RUST_LOG=info' \
    - "$tag" >/dev/null
# The image this one replaces would be left dangling (kept while a container uses it).
if [ -n "$old" ] && [ "$old" != "$(docker image inspect -f '{{.Id}}' "$tag")" ]; then
    docker rmi "$old" >/dev/null 2>&1 || true
fi
echo "built $tag from $physarum ($(du -sh "$root" | cut -f1))"
