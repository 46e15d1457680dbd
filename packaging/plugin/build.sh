#!/usr/bin/env bash
# Builds cairn's managed-plugin bundle: OUT/config.json and OUT/rootfs, ready for
# `docker plugin create NAME OUT`. The rootfs holds the cairn binary with the shared libraries it
# links (found with ldd), fusermount3 (to unmount a dead mount), CA certificates for HTTPS stores,
# and the folders cairn uses. See docs/OPERATIONS.md, "As a managed plugin".
#
# usage: packaging/plugin/build.sh OUT [CAIRN_BINARY]   (default binary: target/release/cairn)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: build.sh OUT [CAIRN_BINARY]}"
binary="${2:-$here/../../target/release/cairn}"
[ -x "$binary" ] || { echo "no cairn binary at $binary: run cargo build --release first" >&2; exit 1; }
fusermount="$(command -v fusermount3)" || { echo "fusermount3 is missing: apt-get install fuse3" >&2; exit 1; }

rm -rf "$out"
rootfs="$out/rootfs"
mkdir -p "$rootfs"/{usr/bin,etc/cairn,etc/ssl/certs,var/lib/cairn,mnt/cairn,run/docker/plugins,run/cairn,tmp,dev,proc,sys}
chmod 1777 "$rootfs/tmp"
install -m 0755 "$binary" "$rootfs/usr/bin/cairn"
install -m 0755 "$fusermount" "$rootfs/usr/bin/fusermount3"

# Each library the two programs load, at the path the dynamic loader looks for it.
for program in "$binary" "$fusermount"; do
    ldd "$program" | grep -o '/[^ ]*' | while read -r library; do
        mkdir -p "$rootfs$(dirname "$library")"
        cp -L "$library" "$rootfs$library"
    done
done
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
    cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/"
fi
printf 'root:x:0:0:root:/:/usr/bin/cairn\n' > "$rootfs/etc/passwd"
printf 'root:x:0:\n' > "$rootfs/etc/group"
printf 'hosts: files dns\n' > "$rootfs/etc/nsswitch.conf"
touch "$rootfs/etc/hosts" "$rootfs/etc/resolv.conf"

cp "$here/config.json" "$out/config.json"
echo "bundle in $out: docker plugin create cairn $out"
