#!/usr/bin/env bash
# Build a small real disk image: an ext4 filesystem (made without mounting, mke2fs -d) holding
# real system files, in a sparse raw file. Usage: make-image.sh OUT.raw [SIZE] [SOURCE_DIR...]
set -euo pipefail
out="$1"; size="${2:-1G}"; shift 2 || shift $#
stage="$(mktemp -d)"
trap 'rm -rf "$stage"' EXIT
srcs=("$@")
[ ${#srcs[@]} -gt 0 ] || srcs=(/usr/share/doc /usr/lib/python3 /usr/share/zoneinfo)
mkdir -p "$stage/root/etc"
for s in "${srcs[@]}"; do
    [ -d "$s" ] || continue
    mkdir -p "$stage/root$(dirname "$s")"
    cp -a "$s" "$stage/root$(dirname "$s")/" 2>/dev/null || true
done
cp /etc/os-release "$stage/root/etc/" 2>/dev/null || true
rm -f "$out"
truncate -s "$size" "$out"
mke2fs -q -F -t ext4 -L barge-demo -d "$stage/root" "$out" >/dev/null
