#!/usr/bin/env bash
# Runs ../shared/anchors/flink/setup.sh first (once). About 15 minutes; Flink takes most of it.
# usage: bench/scripts/flink_10m.sh
# Sluice (redb state + redb storage, incremental default) vs Flink RocksDB, 10 M keys, 30 M events, p2, 5 s.
set -u
T=${CARGO_TARGET_DIR:-target}/release
cd "$(dirname "$0")/../.." && cargo build --release -q -p sluice-bench --bin e2e || exit 1
echo "== sluice"
/usr/bin/time -v $T/e2e --child '{"state":"redb","storage":"redb","interval_ms":5000,"mode":"exactly-once","parallelism":2,"events":30000000,"keys":10000000,"fail":false}' 2>/tmp/cmp-sluice.time
grep -E "Maximum resident" /tmp/cmp-sluice.time
echo "== flink"
cd ../shared/anchors/flink
FLINK_LOG=1 /usr/bin/time -v ./run.sh 30000000 10000000 2 5000 rocksdb 2>/tmp/cmp-flink.time
grep -E "Maximum resident" /tmp/cmp-flink.time
A=${FLINK_ANCHOR_DIR:-${TMPDIR:-/tmp}/sluice-flink-anchor}
grep -o "checkpointDuration=[0-9]*" $A/last.log | cut -d= -f2 | sort -n | awk '{a[NR]=$1} END {print "flink checkpoints:", NR, "p50 ms:", a[int((NR+1)/2)]}'
grep -o "checkpointedSize=[0-9]*\|fullSize=[0-9]*\|size=[0-9]*" $A/last.log | tail -2
