#!/usr/bin/env bash
# cairn side by side with its peers: rclone mount (--vfs-cache-mode full) and s3fs (with its
# cache), on the same S3 server and bucket, with the same part size (8 MiB) and concurrency (8);
# plus the limits: the same work on the local disk that holds the caches, and the store's own
# speed through the SDK alone. Each workload runs BENCH_ROUNDS times on each (median reported).
# Not a test: it asserts nothing. Writes benches/results/NAME.md and NAME.png, NAME being
# BENCH_OUT (default peers-DATE; name a partial run so it does not replace the full one).
#
#   sudo benches/peers.sh          # BENCH_MIB=1024 BENCH_ROUNDS=3 BENCH_FILES=10000
#                                  # BENCH_TARGETS="local cairn rclone s3fs" BENCH_OUT=peers-DATE
#
# The S3 server is s3rver (see benches/README.md for why), installed from npm under
# $CAIRN_CACHE_DIR; fio and matplotlib are installed too.
set -euo pipefail
cd "$(dirname "$0")/.."
MIB="${BENCH_MIB:-1024}"
ROUNDS="${BENCH_ROUNDS:-3}"
FILES="${BENCH_FILES:-10000}"
CACHE="${CAIRN_CACHE_DIR:-/var/tmp/cairn-ci}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CACHE/target}"
[ "$(id -u)" -eq 0 ] || { echo "run as root (FUSE, drop_caches)" >&2; exit 1; }

say() { printf '==> %s\n' "$*" >&2; }
# program:package pairs; a program already on the PATH (however installed) is enough.
for pair in fusermount3:fuse3 rclone:rclone s3fs:s3fs fio:fio sqlite3:sqlite3 npm:npm curl:curl; do
    command -v "${pair%%:*}" >/dev/null || {
        say "installing ${pair#*:}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pair#*:}" >/dev/null
    }
done
S3RVER="$CACHE/s3rver/node_modules/.bin/s3rver"
if [ ! -x "$S3RVER" ]; then
    say "installing s3rver 3.7.1 from npm"
    mkdir -p "$CACHE/s3rver"
    (cd "$CACHE/s3rver" && npm install --no-audit --no-fund --silent s3rver@3.7.1)
fi
PLOT="$CACHE/venv-bench"
if [ ! -x "$PLOT/bin/python" ] || ! "$PLOT/bin/python" -c 'import matplotlib' 2>/dev/null; then
    say "installing matplotlib into $PLOT"
    python3 -m venv "$PLOT" && "$PLOT/bin/pip" install -q matplotlib
fi
say "building cairn (release)"
cargo build --release --quiet
cargo build --release --quiet -p cairn-fs --example raw_store
CAIRN="$CARGO_TARGET_DIR/release/cairn"
RAW="$CARGO_TARGET_DIR/release/examples/raw_store"

WORK=$(mktemp -d /var/tmp/cairn-peers.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
ENDPOINT="http://127.0.0.1:$PORT"
mkdir -p "$WORK/s3"
# s3rver's continuation tokens use a cipher that Node 17+ only has with the legacy provider.
NODE_OPTIONS=--openssl-legacy-provider "$S3RVER" -d "$WORK/s3" -a 127.0.0.1 -p "$PORT" --configure-bucket bench --silent >"$WORK/s3rver.log" 2>&1 &
SERVER_PID=$!
declare -A PIDS=()
cleanup() {
    for tool in "${!PIDS[@]}"; do unmount "$tool"; done
    kill "$SERVER_PID" 2>/dev/null || true
    if [ -n "${BENCH_KEEP:-}" ]; then echo "kept $WORK" >&2; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
for _ in $(seq 100); do curl -s "$ENDPOINT" >/dev/null && break; sleep 0.1; done
printf 'aws_access_key_id = S3RVER\naws_secret_access_key = S3RVER\n' >"$WORK/cairn.secret"
printf 'S3RVER:S3RVER\n' >"$WORK/s3fs.passwd"
chmod 600 "$WORK/s3fs.passwd"
export RCLONE_CONFIG_BENCH_TYPE=s3 RCLONE_CONFIG_BENCH_PROVIDER=Other \
    RCLONE_CONFIG_BENCH_ENDPOINT="$ENDPOINT" RCLONE_CONFIG_BENCH_ACCESS_KEY_ID=S3RVER \
    RCLONE_CONFIG_BENCH_SECRET_ACCESS_KEY=S3RVER RCLONE_CONFIG_BENCH_FORCE_PATH_STYLE=true

# mount TOOL: mounts TOOL's prefix of the bucket on $WORK/mnt-TOOL with a cache of its own
# (emptied: every mount starts cold).
mount_tool() {
    local tool=$1 mnt="$WORK/mnt-$1" cache="$WORK/cache-$1"
    rm -rf "$cache"; mkdir -p "$mnt" "$cache"
    case $tool in
        cairn)
            # The metadata TTL the plugin gives a volume of the default access, exclusive
            # (BENCH_CAIRN_TTL=2 for a shared volume's, `cairn mount`'s own default).
            "$CAIRN" mount "s3://bench/cairn?endpoint=$ENDPOINT&secret_file=$WORK/cairn.secret" \
                "$mnt" --cache-dir "$cache" --cache-size 64G --metadata-ttl "${BENCH_CAIRN_TTL:-60}" \
                ${CAIRN_EXTRA:-} >>"$WORK/cairn.log" 2>&1 &
            ;;
        rclone)
            # rclone 1.60 fails to build its S3 client when AWS_CA_BUNDLE is set (plain HTTP here).
            env -u AWS_CA_BUNDLE rclone mount bench:bench/rclone "$mnt" --vfs-cache-mode full --cache-dir "$cache" \
                --s3-chunk-size 8M --s3-upload-concurrency 8 --transfers 8 \
                --vfs-cache-max-size 64G >>"$WORK/rclone.log" 2>&1 &
            ;;
        s3fs)
            s3fs bench:/s3fs "$mnt" -f -o url="$ENDPOINT" -o use_path_request_style \
                -o passwd_file="$WORK/s3fs.passwd" -o use_cache="$cache" \
                -o multipart_size=8 -o parallel_count=8 >>"$WORK/s3fs.log" 2>&1 &
            ;;
    esac
    PIDS[$tool]=$!
    for _ in $(seq 200); do grep -q " $mnt " /proc/mounts && return; sleep 0.05; done
    echo "$tool did not mount: see $WORK/$tool.log" >&2; exit 1
}

# unmount TOOL: the way each is meant to stop (cairn and rclone upload what is left first).
unmount() {
    local tool=$1 pid=${PIDS[$1]:-}
    [ -n "$pid" ] || return 0
    fusermount3 -u "$WORK/mnt-$tool" 2>/dev/null || umount -l "$WORK/mnt-$tool" 2>/dev/null || true
    for _ in $(seq 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill "$pid" 2>/dev/null || true
    unset "PIDS[$tool]"
}

# peak_mib TOOL: the mount process's peak resident memory so far.
peak_mib() {
    awk '/VmHWM/ {printf "%d", $2 / 1024}' "/proc/${PIDS[$1]}/status" 2>/dev/null || echo "?"
}

# stored_size KEY: the size the store reports for KEY (empty if it has none).
stored_size() {
    # s3rver answers a HEAD of a missing key with a 404 that has a Content-Length of its own.
    curl -sI "$ENDPOINT/bench/$1" \
        | awk 'NR == 1 {found = ($2 == 200)} found && tolower($1) == "content-length:" {print $2+0}'
}

# stored_whole KEY: whether the store holds KEY complete (MIB MiB), read from s3rver's own files
# rather than asked over HTTP. s3rver writes an object's file while it completes a multipart
# upload and its checksum only at the end; a HEAD or a listing in between makes it hash the
# partial file (up to 1 GiB, on its one thread), which slowed the completion being timed (cairn's:
# 5.3 s instead of 3.7 s). The metadata file is written last.
stored_whole() {
    local object="$WORK/s3/bench/$1._S3rver_object"
    [ -f "$WORK/s3/bench/$1._S3rver_metadata.json" ] \
        && [ "$(stat -c %s "$object" 2>/dev/null)" = "$((MIB << 20))" ]
}

# no_big TARGET: deletes TARGET's big file from the store (a leftover would look drained at once).
no_big() {
    curl -s -X DELETE "$ENDPOINT/bench/$1/big" >/dev/null
    [ -z "$(stored_size "$1/big")" ] || { echo "could not delete $1/big" >&2; exit 1; }
}

# seconds_until_stored TARGET T0: waits until the store holds TARGET's big file whole; prints
# the seconds since T0.
seconds_until_stored() {
    until stored_whole "$1/big"; do sleep 0.2; done
    python3 -c "print(f'{$(now) - $2:.3f}')"
}

now() { date +%s.%N; }
median() { sort -g | awk '{v[NR] = $1} END {print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2}'; }

# time_of COMMAND...: seconds it takes (page cache flushed first, so runs start alike).
time_of() {
    sync; echo 3 >/proc/sys/vm/drop_caches
    local t0 t1
    t0=$(now); "$@" >/dev/null; t1=$(now)
    python3 -c "print(f'{$t1 - $t0:.3f}')"
}

write_big_noflush() { dd if=/dev/zero of="$1/big" bs=1M count="$MIB" status=none; }
read_big() { cat "$1/big" >/dev/null; }
small_create() { python3 - "$1/small" "$FILES" <<'EOF'
import os, sys
root, n = sys.argv[1], int(sys.argv[2])
os.makedirs(root, exist_ok=True)
block = os.urandom(4096)
for i in range(n):
    with open(f"{root}/f{i}", "wb") as f:
        f.write(block)
EOF
}
small_stat() { python3 -c "import os,sys; [os.stat(f'{sys.argv[1]}/small/f{i}') for i in range(int(sys.argv[2]))]" "$1" "$FILES"; }
small_read() { python3 -c "import sys; [open(f'{sys.argv[1]}/small/f{i}','rb').read() for i in range(int(sys.argv[2]))]" "$1" "$FILES"; }
list_small() { ls -l "$1/small" >/dev/null; }
SOURCE=$(ls ~/.cargo/registry/cache/*/aws-sdk-s3-*.crate 2>/dev/null | head -1)
untar() { mkdir -p "$1/src" && tar xzf "$SOURCE" -C "$1/src"; }
list_tree() { ls -lR "$1/src" >/dev/null; }
remove_tree() { rm -rf "$1/src"; }
sqlite_inserts() { # DIR [DATABASE NAME]
    local db="$1/${2:-bench.db}"
    sqlite3 "$db" "PRAGMA synchronous=FULL; PRAGMA journal_mode=DELETE; CREATE TABLE IF NOT EXISTS t(id INTEGER PRIMARY KEY, v BLOB);"
    for _ in $(seq 20); do
        printf 'BEGIN; %s COMMIT;\n' "$(for _ in $(seq 10); do printf 'INSERT INTO t(v) VALUES (randomblob(512)); '; done)"
    done | sqlite3 "$db" -cmd "PRAGMA synchronous=FULL;"
}
fio_random() { # DIR BLOCKSIZE: MiB/s of random reads on the big file, for 10 seconds
    fio --name=rand --filename="$1/big" --rw=randread --bs="$2" --size="${MIB}M" --runtime=10 \
        --time_based --ioengine=psync --invalidate=1 --output-format=terse --terse-version=3 \
        2>/dev/null | awk -F';' '{printf "%.1f", $7 / 1024}'
}

declare -A RESULT=()   # "workload|target" -> median seconds (or MiB/s for fio)
WORKLOADS=()
# BENCH_TARGETS picks some of them (e.g. "local cairn" to measure a change to cairn alone).
read -r -a TARGETS <<<"${BENCH_TARGETS:-local cairn rclone s3fs}"
dir_of() { [ "$1" = local ] && echo "$WORK/local" || echo "$WORK/mnt-$1"; }
record() { # workload target value...
    local workload=$1 target=$2; shift 2
    [[ " ${WORKLOADS[*]} " == *" $workload "* ]] || WORKLOADS+=("$workload")
    RESULT["$workload|$target"]=$(printf '%s\n' "$@" | median)
    say "$(date +%T) $target: $workload: ${RESULT["$workload|$target"]}"
}

NO_DELAY_DRAIN="write ${MIB} MiB, until the store has it, cairn with writeback_delay=0"
# The big file's rows first, in this order (the local disk records no drain).
WORKLOADS=("write ${MIB} MiB, until close()" "write ${MIB} MiB, until the store has it" "$NO_DELAY_DRAIN")
declare -A PEAK=() LISTED=()
for target in "${TARGETS[@]}"; do
    say "$target"
    writes=(); drains=(); colds=(); warms=()
    for round in $(seq "$ROUNDS"); do
        dir=$(dir_of "$target"); rm -rf "$WORK/local"; mkdir -p "$WORK/local"
        [ "$target" = local ] || { no_big "$target"; mount_tool "$target"; }
        t0=$(now)
        writes+=("$(time_of write_big_noflush "$dir")")
        if [ "$target" != local ]; then
            drains+=("$(seconds_until_stored "$target" "$t0")")
            PEAK[$target]=$(peak_mib "$target")
            unmount "$target"; mount_tool "$target"   # cold: an empty cache
        fi
        colds+=("$(time_of read_big "$dir")")
        warms+=("$(time_of read_big "$dir")")
        [ "$round" -lt "$ROUNDS" ] && [ "$target" != local ] && unmount "$target"
    done
    record "write ${MIB} MiB, until close()" "$target" "${writes[@]}"
    [ "$target" = local ] || record "write ${MIB} MiB, until the store has it" "$target" "${drains[@]}"
    # The peers have no write-back delay to turn off: the row below compares with their drain.
    case $target in rclone | s3fs) record "$NO_DELAY_DRAIN" "$target" "${drains[@]}" ;; esac
    record "read ${MIB} MiB, cold" "$target" "${colds[@]}"
    record "read ${MIB} MiB, warm" "$target" "${warms[@]}"
    [ "$target" = local ] || PEAK[$target]="${PEAK[$target]}/$(peak_mib "$target")"
    dir=$(dir_of "$target")
    record "random reads 4 KiB (MiB/s)" "$target" "$(fio_random "$dir" 4k)"
    record "random reads 256 KiB (MiB/s)" "$target" "$(fio_random "$dir" 256k)"
    rm -f "$dir/big"
    if [ "$target" = cairn ]; then
        # The drain again with no write-back delay: uploads start at close(), as s3fs's do.
        unmount cairn; drains=()
        for round in $(seq "$ROUNDS"); do
            no_big cairn; CAIRN_EXTRA="--writeback-delay 0" mount_tool cairn
            t0=$(now); time_of write_big_noflush "$dir" >/dev/null
            drains+=("$(seconds_until_stored cairn "$t0")")
            rm -f "$dir/big"; unmount cairn
        done
        record "$NO_DELAY_DRAIN" cairn "${drains[@]}"
        mount_tool cairn
    fi
    record "$FILES files of 4 KiB: create" "$target" "$(time_of small_create "$dir")"
    record "$FILES files: stat all" "$target" "$(time_of small_stat "$dir")"
    record "$FILES files: read all" "$target" "$(time_of small_read "$dir")"
    record "ls -l of $FILES entries, warm" "$target" "$(time_of list_small "$dir")"
    if [ "$target" != local ]; then unmount "$target"; mount_tool "$target"; fi
    record "ls -l of $FILES entries, cold" "$target" "$(time_of list_small "$dir")"
    LISTED[$target]=$(ls "$dir/small" 2>/dev/null | wc -l)
    record "untar $(basename "$SOURCE" .crate)" "$target" "$(time_of untar "$dir")"
    record "ls -lR of it" "$target" "$(time_of list_tree "$dir")"
    record "rm -rf of it" "$target" "$(time_of remove_tree "$dir")"
    record "SQLite: 20 transactions, synchronous=FULL" "$target" "$(time_of sqlite_inserts "$dir")"
    # The same with cairn's fsync returning once the local disk has the data, as the peers' do.
    if [ "$target" = cairn ]; then unmount cairn; CAIRN_EXTRA="--fsync local" mount_tool cairn; fi
    record "SQLite, the same, cairn with fsync=local" "$target" "$(time_of sqlite_inserts "$dir" local.db)"
    [ "$target" = local ] || unmount "$target"
done
say "the store alone (SDK, 8 MiB parts, 8 in flight)"
raw=$("$RAW" "s3://bench/raw?endpoint=$ENDPOINT&secret_file=$WORK/cairn.secret" "$MIB")
RAW_PUT=$(awk '/^put / {print $2}' <<<"$raw"); RAW_GET=$(awk '/^get / {print $2}' <<<"$raw")
RAW_GET_COLD=$(awk '/^get-cold / {print $2}' <<<"$raw")

mkdir -p benches/results
stamp=$(date -u +%Y-%m-%d)
name="${BENCH_OUT:-peers-$stamp}"
out="benches/results/$name.md"
{
    echo "# cairn, rclone and s3fs side by side ($stamp)"
    echo
    echo "Machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%d GiB", $2/1048576}' /proc/meminfo), $(uname -r)."
    echo "Server: s3rver 3.7.1 on loopback, its data on the local disk. cairn $(git describe --always --dirty) (metadata TTL ${BENCH_CAIRN_TTL:-60} s),"
    echo "$(rclone version | head -1), $(s3fs --version 2>&1 | head -1 | cut -c1-40). $ROUNDS rounds, medians."
    echo "Seconds unless noted; ratios are cairn's time over the peer's (below 1: cairn is faster; for MiB/s rows, the peer's speed over cairn's)."
    echo
    echo "| workload | local disk | cairn | rclone | s3fs | cairn / rclone | cairn / s3fs |"
    echo "|---|---|---|---|---|---|---|"
    for workload in "${WORKLOADS[@]}"; do
        row="| $workload |"
        for target in local cairn rclone s3fs; do row+=" ${RESULT["$workload|$target"]:--} |"; done
        for peer in rclone s3fs; do
            row+=" $(python3 - "${RESULT["$workload|cairn"]:-}" "${RESULT["$workload|$peer"]:-}" "$workload" <<'EOF'
import sys
c, p, w = sys.argv[1:]
try:
    c, p = float(c), float(p)
    r = (p / c) if "MiB/s" in w else (c / p)
    print(f"{r:.2f}")
except (ValueError, ZeroDivisionError):
    print("-")
EOF
) |"
        done
        echo "$row"
    done
    echo
    echo "The limits: the store alone took $RAW_PUT s to PUT and $RAW_GET s to GET $MIB MiB, and"
    echo "$RAW_GET_COLD s to GET it with this machine's page cache dropped first, as before a cold read."
    echo "Peak resident memory of the mount processes (MiB, after the write / after the reads):"
    for tool in cairn rclone s3fs; do echo "- $tool: ${PEAK[$tool]:-?}"; done
    echo
    echo "Files a fresh mount listed after the $FILES were created and the mount stopped (the"
    echo "way each is meant to stop): cairn ${LISTED[cairn]:-?}, rclone ${LISTED[rclone]:-?}, s3fs ${LISTED[s3fs]:-?}."
} >"$out"
"$PLOT/bin/python" - "$out" "benches/results/$name.png" <<'EOF'
import sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
def ratio(cell):
    try:
        return float(cell)
    except ValueError:
        return float("nan")  # that peer was not run: no bar


rows = []
for line in open(sys.argv[1]):
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == 7 and cells[0] not in ("workload", "---"):
        ratios = [ratio(cell) for cell in cells[5:7]]
        if any(r == r for r in ratios):
            rows.append((cells[0], *ratios))
peers = [(n, label) for n, label in ((1, "cairn / rclone"), (2, "cairn / s3fs"))
         if any(r[n] == r[n] for r in rows)]
fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.5))
y = range(len(rows))
width = 0.8 / max(len(peers), 1)
for k, (n, label) in enumerate(peers):
    offset = (k - (len(peers) - 1) / 2) * width
    ax.barh([i + offset for i in y], [r[n] for r in rows], width, label=label)
ax.axvline(1, color="black", linewidth=0.8)
ax.set_yticks(list(y), [r[0] for r in rows], fontsize=8)
ax.invert_yaxis()
ax.set_xscale("log")
ax.set_xlabel("cairn's cost relative to the peer (below 1: cairn is faster)")
ax.legend()
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
EOF
cat "$out"
echo "chart: benches/results/$name.png"
