#!/usr/bin/env bash
# cairn's own foreground path on small files, two builds side by side (benches/RESULTS.md run N).
# A dir store and a write-back delay of 600 s keep the store out of it: what is timed is what
# cairn adds to the local disk it caches on. Not a test: it asserts nothing.
#
#   benches/foreground.sh OLD_CAIRN NEW_CAIRN [ROUNDS]     # as root; ROUNDS defaults to 4
#
# Each round runs, in one process, on the local disk and then through each build's mount: untar
# of a source tree (crates from cargo's cache, about 3,700 files), 2,000 creates of 4 KiB files,
# a stat of each, `ls -l` of them, a read of each, and `rm -rf` of the tree. The builds alternate;
# the table has each row's median and the new build's time over the old one's.
set -euo pipefail
[ $# -ge 2 ] || { echo "usage: $0 OLD_CAIRN NEW_CAIRN [ROUNDS]" >&2; exit 2; }
[ "$(id -u)" -eq 0 ] || { echo "run as root (FUSE)" >&2; exit 1; }
OLD=$1 NEW=$2 ROUNDS=${3:-4}
WORK=$(mktemp -d /var/tmp/cairn-foreground.XXXXXX)
MNT="$WORK/mnt"
cleanup() {
    mountpoint -q "$MNT" && umount "$MNT"
    rm -rf "$WORK"
}
trap cleanup EXIT

# The source tree: crates from cargo's cache, the biggest first, until about 3,700 files.
registry=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/ | head -1)
python3 - "$registry" > "$WORK/crates" <<'PY'
import os, sys
root = sys.argv[1]
def files(crate):
    return sum(len(names) for _, _, names in os.walk(os.path.join(root, crate)))
total = 0
for count, crate in sorted(((files(c), c) for c in os.listdir(root)), reverse=True):
    if total + count <= 4000:
        print(crate)
        total += count
    if total > 3600:
        break
PY
tar -C "$registry" -cf "$WORK/src.tar" $(cat "$WORK/crates")
echo "source tree: $(tar -tf "$WORK/src.tar" | wc -l) entries, $(du -m "$WORK/src.tar" | cut -f1) MB"

cat > "$WORK/workload.py" <<'EOF'
import os, subprocess, sys, time
root, tree = sys.argv[1], sys.argv[2]
def timed(label, work):
    started = time.perf_counter()
    work()
    print(f"{label}\t{time.perf_counter() - started:.4f}", flush=True)
def untar():
    os.makedirs(f"{root}/tree")
    subprocess.run(["tar", "-xf", tree, "-C", f"{root}/tree"], check=True)
def creates():
    os.makedirs(f"{root}/many")
    for i in range(2000):
        with open(f"{root}/many/f{i}", "wb") as f:
            f.write(b"x" * 4096)
def stats():
    for i in range(2000):
        os.stat(f"{root}/many/f{i}")
def ls():
    subprocess.run(["ls", "-l", f"{root}/many"], check=True, stdout=subprocess.DEVNULL)
def reads():
    for i in range(2000):
        with open(f"{root}/many/f{i}", "rb") as f:
            f.read()
def rm():
    subprocess.run(["rm", "-rf", f"{root}/tree"], check=True)
for label, work in [("untar", untar), ("2,000 creates", creates), ("2,000 stats", stats),
                    ("ls -l of 2,000", ls), ("2,000 reads", reads), ("rm -rf of the tree", rm)]:
    timed(label, work)
EOF

# One round on the local disk or through a mount of `binary`; prints "label<TAB>seconds" lines.
round() {
    local binary=$1 root
    rm -rf "$WORK/store" "$WORK/cache" "$WORK/local"
    mkdir -p "$WORK/store/v" "$WORK/cache" "$WORK/local" "$MNT"
    if [ "$binary" = local ]; then
        python3 "$WORK/workload.py" "$WORK/local" "$WORK/src.tar"
        return
    fi
    "$binary" mount "dir://$WORK/store/v" "$MNT" --cache-dir "$WORK/cache" \
        --writeback-delay 600 --metadata-ttl 60 >"$WORK/mount.log" 2>&1 &
    local pid=$!
    for _ in $(seq 100); do mountpoint -q "$MNT" && break; sleep 0.1; done
    python3 "$WORK/workload.py" "$MNT" "$WORK/src.tar"
    kill -INT "$pid"
    wait "$pid" || true
}

for r in $(seq "$ROUNDS"); do
    round local | sed "s|^|local\t|"
    round "$OLD" | sed "s|^|old\t|"
    round "$NEW" | sed "s|^|new\t|"
done > "$WORK/times"

python3 - "$WORK/times" "$OLD" "$NEW" <<'EOF'
import statistics, sys
rows = {}
for line in open(sys.argv[1]):
    target, label, seconds = line.rstrip("\n").split("\t")
    rows.setdefault(label, {}).setdefault(target, []).append(float(seconds))
print(f"old: {sys.argv[2]}, new: {sys.argv[3]}, medians of {len(rows['untar']['local'])} rounds")
print("| row | local disk | old | new | new / old |")
print("|---|---|---|---|---|")
for label, by in rows.items():
    local, o, n = (statistics.median(by[t]) for t in ("local", "old", "new"))
    print(f"| {label} | {local:.3f} s | {o:.3f} s | {n:.3f} s | {n / o:.2f} |")
EOF
