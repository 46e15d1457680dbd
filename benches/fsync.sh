#!/usr/bin/env bash
# Durable fsync through cairn (benches/RESULTS.md, run O): SQLite with synchronous=FULL in
# rollback-journal and WAL mode, and PostgreSQL's pgbench, on the local disk and through
# `cairn mount` over moto (a real S3 server over HTTP), optionally behind the testkit latency
# proxy. Not a test: it asserts nothing.
#
#   benches/fsync.sh [LATENCY_MS] [TARGETS]    # as root; LATENCY_MS defaults to 0
#
# TARGETS (default "disk whole log local"), each a column:
#   disk   the local disk;
#   whole  `cairn mount` with no lease: an fsync uploads the whole file (as every fsync did
#          before the fsync log);
#   log    `cairn mount` as the volume's one writer (--lease-store/--lease-name, as the plugin
#          mounts an exclusive volume): an fsync of a stored file sends what changed as one
#          record of the fsync log;
#   local  `--fsync local`: an fsync returns once the local disk has the data;
#   s3fs   s3fs (its fsync uploads the file).
set -euo pipefail
[ "$(id -u)" -eq 0 ] || { echo "run as root (FUSE)" >&2; exit 1; }
LATENCY=${1:-0}
TARGETS=${2:-disk whole log local}
cd "$(dirname "$0")/.."
CACHE=${CAIRN_CACHE:-/var/tmp/cairn-ci}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$CACHE/target}
MOTO=$(ls -d "$CACHE"/venv-moto-*/bin/moto_server 2>/dev/null | head -1)
[ -x "$MOTO" ] || { echo "no moto: run scripts/test once (it installs moto under $CACHE)" >&2; exit 1; }
for pair in sqlite3:sqlite3 pgbench:postgresql-client initdb:postgresql s3fs:s3fs; do
    command -v "${pair%%:*}" >/dev/null || ls /usr/lib/postgresql/*/bin/"${pair%%:*}" >/dev/null 2>&1 || {
        echo "installing ${pair#*:}" >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pair#*:}" >/dev/null
    }
done
PGBIN=$(ls -d /usr/lib/postgresql/*/bin | tail -1)
cargo build --release --quiet
cargo build --release --quiet -p cairn-testkit --example latency_proxy
CAIRN="$CARGO_TARGET_DIR/release/cairn"

WORK=$(mktemp -d /var/tmp/cairn-fsync.XXXXXX)
chmod 755 "$WORK"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PORT=$(free_port)
"$MOTO" -H 127.0.0.1 -p "$PORT" >"$WORK/moto.log" 2>&1 &
PIDS=($!)
MOUNT_PID=
cleanup() {
    if [ -f "$WORK/mnt/pg/postmaster.pid" ]; then
        runuser -u postgres -- "$PGBIN/pg_ctl" -D "$WORK/mnt/pg" -m immediate stop >/dev/null 2>&1 || true
    fi
    [ -n "$MOUNT_PID" ] && stop_mount
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    rm -rf "$WORK"
}
trap cleanup EXIT
for _ in $(seq 100); do curl -s "http://127.0.0.1:$PORT" >/dev/null && break; sleep 0.1; done
curl -s -X PUT "http://127.0.0.1:$PORT/bench" >/dev/null
if [ "$LATENCY" -gt 0 ]; then
    "$CARGO_TARGET_DIR/release/examples/latency_proxy" "$PORT" "$LATENCY" >"$WORK/proxy.port" &
    PIDS+=($!)
    for _ in $(seq 100); do [ -s "$WORK/proxy.port" ] && break; sleep 0.1; done
    PORT=$(cat "$WORK/proxy.port")
fi
ENDPOINT="http://127.0.0.1:$PORT"
printf 'aws_access_key_id = bench\naws_secret_access_key = bench\n' >"$WORK/secret"
printf 'bench:bench\n' >"$WORK/s3fs.passwd"
chmod 600 "$WORK/s3fs.passwd"

# start_mount TARGET: mounts a fresh prefix on $WORK/mnt (the local disk: a plain directory).
RUN=0
start_mount() {
    RUN=$((RUN + 1))
    local mnt="$WORK/mnt" root="s3://bench/$1-$RUN?endpoint=$ENDPOINT&secret_file=$WORK/secret"
    local data="s3://bench/$1-$RUN/v?endpoint=$ENDPOINT&secret_file=$WORK/secret"
    rm -rf "$mnt" "$WORK/cache"; mkdir -p "$mnt"
    case $1 in
        disk) return ;;
        whole) "$CAIRN" mount "$data" "$mnt" --cache-dir "$WORK/cache" >>"$WORK/cairn.log" 2>&1 & ;;
        log) "$CAIRN" mount "$data" "$mnt" --cache-dir "$WORK/cache" --lease-store "$root" \
            --lease-name v >>"$WORK/cairn.log" 2>&1 & ;;
        local) "$CAIRN" mount "$data" "$mnt" --cache-dir "$WORK/cache" --fsync local \
            >>"$WORK/cairn.log" 2>&1 & ;;
        s3fs) s3fs "bench:/$1-$RUN" "$mnt" -f -o url="$ENDPOINT" -o use_path_request_style \
            -o passwd_file="$WORK/s3fs.passwd" -o use_cache="$WORK/cache" -o allow_other \
            >>"$WORK/s3fs.log" 2>&1 & ;;
    esac
    MOUNT_PID=$!
    for _ in $(seq 200); do grep -q " $mnt " /proc/mounts && return; sleep 0.05; done
    echo "$1 did not mount: see $WORK" >&2; exit 1
}
stop_mount() {
    [ -n "$MOUNT_PID" ] || return 0
    fusermount3 -u "$WORK/mnt" 2>/dev/null || umount -l "$WORK/mnt" 2>/dev/null || true
    for _ in $(seq 600); do kill -0 "$MOUNT_PID" 2>/dev/null || break; sleep 0.1; done
    kill "$MOUNT_PID" 2>/dev/null || true
    MOUNT_PID=
}

# sqlite_tps MODE N: transactions per second of N single-row inserts, each its own transaction,
# into a database that is already in the store (made, then the mount drained by a remount).
sqlite_tps() {
    local mode=$1 n=$2 db="$WORK/mnt/bench.db"
    sqlite3 "$db" "PRAGMA journal_mode=$mode; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);
        INSERT INTO t(v) SELECT randomblob(1000) FROM generate_series(1, 2000);" >/dev/null 2>&1 \
        || sqlite3 "$db" "PRAGMA journal_mode=$mode; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB);
        WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<2000)
        INSERT INTO t(v) SELECT randomblob(1000) FROM c;" >/dev/null
    sync
    python3 - "$db" "$mode" "$n" <<'PY'
import sqlite3, sys, time
db, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
con = sqlite3.connect(db, isolation_level=None)
con.execute("PRAGMA synchronous=FULL")
con.execute(f"PRAGMA journal_mode={mode}")
started = time.perf_counter()
for i in range(n):
    con.execute("BEGIN")
    con.execute("INSERT INTO t(v) VALUES (randomblob(200))")
    con.execute("COMMIT")
print(f"{n / (time.perf_counter() - started):.1f}")
PY
}

# pgbench_tps: TPS of pgbench -c 4 -j 2 for 20 s on a scale-5 database made on the mount.
pgbench_tps() {
    local data="$WORK/mnt/pg" sock="$WORK/pgsock" port
    port=$(free_port)
    mkdir -p "$data" "$sock"
    chown postgres "$data" "$sock"
    chmod 700 "$data"
    runuser -u postgres -- "$PGBIN/initdb" -D "$data" -A trust >"$WORK/initdb.log" 2>&1
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$data" -l "$sock/pg.log" -w \
        -o "-k $sock -p $port -c listen_addresses=''" start >/dev/null
    runuser -u postgres -- pgbench -h "$sock" -p "$port" -i -s 5 -q postgres >/dev/null 2>&1
    runuser -u postgres -- pgbench -h "$sock" -p "$port" -c 4 -j 2 -T 20 postgres 2>/dev/null \
        | awk '/^tps/ {printf "%.0f", $3}'
    runuser -u postgres -- "$PGBIN/pg_ctl" -D "$data" -m fast -w stop >/dev/null
    rm -rf "$sock"
}

declare -A RESULT
for target in $TARGETS; do
    for workload in rollback wal pgbench; do
        start_mount "$target"
        case $workload in
            rollback) RESULT[$target,$workload]=$(sqlite_tps DELETE 100) ;;
            wal) RESULT[$target,$workload]=$(sqlite_tps WAL 200) ;;
            pgbench) RESULT[$target,$workload]=$(pgbench_tps) ;;
        esac
        echo "$target $workload: ${RESULT[$target,$workload]}" >&2
        stop_mount
        rm -rf "$WORK/mnt"
    done
done

echo
echo "moto on loopback, ${LATENCY} ms added to each store request; transactions per second"
printf '| workload |'; for t in $TARGETS; do printf ' %s |' "$t"; done; echo
printf '|---|'; for _ in $TARGETS; do printf -- '---|'; done; echo
for workload in rollback wal pgbench; do
    case $workload in
        rollback) label="SQLite, rollback journal, 100 tx" ;;
        wal) label="SQLite, WAL, 200 tx" ;;
        pgbench) label="pgbench -s 5 -c 4 -j 2 -T 20" ;;
    esac
    printf '| %s |' "$label"
    for t in $TARGETS; do printf ' %s |' "${RESULT[$t,$workload]:-?}"; done
    echo
done
