#!/usr/bin/env bash
# The write-back benchmark: how fast writes return through a cairn mount compared with the same
# writes to the local disk that holds cairn's cache, and how long until the store holds
# everything. One run, side by side, reported as ratios. Not a test: it asserts nothing.
#
#   sudo benches/writeback.sh            # 1 GiB sequential write (set BENCH_MIB to change)
#
# It builds cairn in release mode, starts moto's S3 server on a free loopback port (installed by
# scripts/test), mounts a fresh prefix, and runs:
#   1. a sequential write of BENCH_MIB MiB (dd, 1 MiB blocks), timed until close() returns;
#   2. 10,000 files of 4 KiB created;
#   3. untar of a real source tree (the aws-sdk-s3 crate from cargo's cache: ~1,350 files);
#   4. 16 bytes changed in the middle of the big file, remounted on an empty cache;
#   and after each, `cairn flush`: the time until the store holds everything.
set -euo pipefail
cd "$(dirname "$0")/.."

MIB="${BENCH_MIB:-1024}"
CACHE="${CAIRN_CACHE_DIR:-/var/tmp/cairn-ci}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
MOTO="$CACHE/venv-moto-5.2.5/bin/moto_server"
[ -x "$MOTO" ] || { echo "moto is missing: run scripts/test once (it installs it)" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "run as root (FUSE)" >&2; exit 1; }

cargo build --release --quiet
CAIRN="$CARGO_TARGET_DIR/release/cairn"
WORK=$(mktemp -d /var/tmp/cairn-bench.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
"$MOTO" -H 127.0.0.1 -p "$PORT" >"$WORK/moto.log" 2>&1 &
MOTO_PID=$!
MNT="$WORK/mnt"
LOCAL="$WORK/local"
mkdir -p "$MNT" "$LOCAL"
cleanup() {
    kill -TERM "${MOUNT_PID:-0}" 2>/dev/null || true
    sleep 1
    umount -l "$MNT" 2>/dev/null || true
    kill "$MOTO_PID" 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT
for _ in $(seq 50); do curl -s "http://127.0.0.1:$PORT" >/dev/null && break; sleep 0.2; done
curl -s -X PUT "http://127.0.0.1:$PORT/bench" >/dev/null
printf 'aws_access_key_id = bench\naws_secret_access_key = bench\n' >"$WORK/secret"
SPEC="s3://bench/vol?endpoint=http://127.0.0.1:$PORT&secret_file=$WORK/secret"
"$CAIRN" mount "$SPEC" "$MNT" --cache-dir "$WORK/cache" --cache-size 64G >"$WORK/mount.log" 2>&1 &
MOUNT_PID=$!
for _ in $(seq 100); do grep -q " $MNT " /proc/mounts && break; sleep 0.1; done

now() { date +%s.%N; }
elapsed() { python3 -c "print(f'{$2 - $1:.3f}')"; }
ratio() { python3 -c "print(f'{$1 / $2:.1f}x' if $2 > 0 else 'n/a')"; }

small_files() {
    mkdir -p "$1/small"
    local block
    block=$(head -c 4096 /dev/urandom | base64 -w0 | head -c 4096)
    for i in $(seq 10000); do printf '%s' "$block" >"$1/small/f$i"; done
}
SOURCE=$(ls ~/.cargo/registry/cache/*/aws-sdk-s3-*.crate | head -1)

rows=()
run() { # name, command (with DIR placeholder)
    local name=$1 command=$2 t0 t1 t2 t3 t4 local_time cairn_time drain_time
    # Each timed run starts with no dirty pages left over from the one before.
    sync; t0=$(now); eval "${command//DIR/$LOCAL}"; t1=$(now)
    sync; t2=$(now); eval "${command//DIR/$MNT}"; t3=$(now)
    "$CAIRN" flush "$MNT" >/dev/null; t4=$(now)
    local_time=$(elapsed "$t0" "$t1"); cairn_time=$(elapsed "$t2" "$t3"); drain_time=$(elapsed "$t2" "$t4")
    rows+=("| $name | $local_time s | $cairn_time s | $(ratio "$cairn_time" "$local_time") | $drain_time s |")
}

run "sequential write, $MIB MiB, until close()" "dd if=/dev/zero of=DIR/big bs=1M count=$MIB status=none"
run "10,000 files of 4 KiB" "small_files DIR"
run "untar $(basename "$SOURCE" .crate) ($(tar tzf "$SOURCE" | wc -l) files)" "mkdir -p DIR/src && tar xzf $SOURCE -C DIR/src"

# A small change to a large stored file that is not cached here: remount on an empty cache,
# then change 16 bytes in the middle of the big file (the upload copies the other parts inside
# the store).
kill -TERM "$MOUNT_PID"; wait "$MOUNT_PID" || true
"$CAIRN" mount "$SPEC" "$MNT" --cache-dir "$WORK/cache-cold" --cache-size 64G >>"$WORK/mount.log" 2>&1 &
MOUNT_PID=$!
for _ in $(seq 100); do grep -q " $MNT " /proc/mounts && break; sleep 0.1; done
run "16 bytes changed mid-file of the $MIB MiB file, cold cache" \
    "printf 'sixteen  bytes!!' | dd of=DIR/big bs=16 seek=$((MIB * 32768)) conv=notrunc status=none"

echo "cairn write-back benchmark, $(date -u +%Y-%m-%d), $(nproc) cores, moto $("$MOTO" --version 2>/dev/null || echo 5.2.5) on loopback"
echo
echo "| workload | local disk | cairn (returns) | cairn / local | until the store holds it |"
echo "|---|---|---|---|---|"
printf '%s\n' "${rows[@]}"
echo
echo "Both columns are until the command returns (the data in the page cache of the local disk;"
echo "for cairn, also in its cache file and change log); the last column runs from the start of"
echo "the workload until cairn flush returns."
