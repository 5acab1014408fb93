#!/usr/bin/env bash
# Installs the Debian packages the tests and benchmarks use (fio is for benches/io.py, e2fsprogs
# makes and reads the ext4 disk of the Linux-to-/init test and the TCG vhost-user tests, iperf3 is
# their host end of the network test), as root;
# otherwise says what to run.
set -euo pipefail
packages=(acpica-tools cpio qemu-system-x86 qemu-utils util-linux python3 fio curl iproute2 g++ e2fsprogs iperf3)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
    echo "missing packages: ${missing[*]}; run: sudo apt-get install -y ${missing[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${missing[@]}" >/dev/null
