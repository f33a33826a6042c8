#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine: system packages, then the venv.
set -euo pipefail
cd "$(dirname "$0")/.."
# The VMs and test guests (docs/vm.md, docs/guests.md): qemu-system-x86, ovmf and
# openssh-client boot and reach them; genisoimage, dosfstools and mtools make NoCloud seeds and
# the ESP; debootstrap, fdisk (sfdisk) and e2fsprogs (mke2fs -d) build the Debian test guest.
PKGS="docker-registry skopeo qemu-utils qemu-system-x86 ovmf openssh-client genisoimage dosfstools mtools debootstrap fdisk e2fsprogs"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    echo "setup: installing Debian packages:$missing"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
# The Debian package starts a system registry on :5000; barge never needs it.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet docker-registry 2>/dev/null; then
    systemctl stop docker-registry 2>/dev/null || true
fi
PY="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.barge-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -q -e '.[dev]'
    touch "$stamp"
fi
