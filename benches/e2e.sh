#!/usr/bin/env bash
# End-to-end benchmark: generates synthetic bf16 Llama families, warms the page cache and
# times task_arithmetic, ties and gradmatch next to a streaming-copy baseline that reads
# the same input bytes and writes an output of the same size (`gradmerge bench run
# --baseline copy`). Every run appends one JSON line to $OUT/results.jsonl;
# benches/summarize.py turns that file into the table of docs/BENCHMARKS.md.
#
#   benches/e2e.sh                 # all steps, 3 runs each
#   RUNS=5 benches/e2e.sh          # more runs per workload
#   MAX_TENSORS=0 benches/e2e.sh   # the whole 70B-shaped merge (reads ~690 GB of holes)
#
# Data goes to $DATA (default /work/bench-data, gitignored) and is deleted at the end
# unless KEEP=1. Needs about 12 GB of free disk for the dense families.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA=${DATA:-$ROOT/../bench-data}
RUNS=${RUNS:-3}
MAX_TENSORS=${MAX_TENSORS:-10}
KEEP=${KEEP:-0}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

cargo build --release --manifest-path "$ROOT/Cargo.toml" >&2
BIN=$CARGO_TARGET_DIR/release/gradmerge
mkdir -p "$DATA"
OUT=${OUT:-$DATA/e2e}
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"
df -h "$DATA" >&2

# family NAME ARGS...: generate once, reuse when present.
family() {
    local name=$1
    shift
    if [ ! -d "$DATA/$name" ]; then
        "$BIN" bench generate --out "$DATA/$name" "$@" >&2
    fi
}

# measure LABEL FAMILY ARGS...: RUNS runs, tagged with LABEL, appended to results.jsonl.
measure() {
    local label=$1 fam=$2
    shift 2
    for _ in $(seq "$RUNS"); do
        "$BIN" bench run --family "$DATA/$fam" --json "$@" |
            python3 -c 'import json,sys; r=json.load(sys.stdin); r["label"]=sys.argv[1]; print(json.dumps(r))' "$label" >>"$RESULTS"
    done
}

warm() {
    cat "$DATA/$1"/*/*.safetensors >/dev/null
}

# Dense families: 0.46 GB and 2.14 GB per model (llama-7b widths, 2 and 4 layers).
family small --preset llama-7b --scale 2 --layers 2
family medium --preset llama-7b --layers 4

for fam in small medium; do
    warm "$fam"
    for method in task_arithmetic gradmatch; do
        measure "$fam/folder" "$fam" --method "$method" --baseline copy --out "$DATA/out" --force
        measure "$fam/folder" "$fam" --method "$method" --out "$DATA/out" --force
        measure "$fam/sink" "$fam" --method "$method" --baseline copy
        measure "$fam/sink" "$fam" --method "$method"
        # The tile path that every kernel had before the fused loops, for comparison.
        measure "$fam/sink" "$fam" --method "$method" --no-fused
    done
done
# Peak memory follows --budget (the default is 256M).
for budget in 16M 64M 1G; do
    measure "medium/sink, budget $budget" medium --method task_arithmetic --budget "$budget"
done
# TIES is about 20 times slower than the others (see docs/BENCHMARKS.md): small family only.
measure "small/sink" small --method ties
rm -rf "$DATA/out"

# Sparse families for memory at 2.1 GB and 8.6 GB per model (4 and 20 layers); the
# data are holes, so this measures the engine's memory, not the disk.
family sparse-2g --preset llama-7b --layers 4 --sparse
family sparse-8g --preset llama-7b --layers 20 --sparse
for fam in sparse-2g sparse-8g; do
    for method in task_arithmetic gradmatch; do
        measure "$fam/sink" "$fam" --method "$method"
    done
done

# Full-size 70B shapes: 2 models with Fishers, gradmatch into the sink. MAX_TENSORS limits
# the run to the embedding and the first layer, which contain the largest tensors.
family sparse-70b --preset llama-70b --sparse
limit=()
if [ "$MAX_TENSORS" != 0 ]; then
    limit=(--max-tensors "$MAX_TENSORS")
fi
RUNS=1 measure "sparse-70b/sink" sparse-70b --method gradmatch "${limit[@]}"

python3 "$ROOT/benches/summarize.py" "$RESULTS"
if [ "$KEEP" != 1 ]; then
    rm -rf "$DATA/small" "$DATA/medium" "$DATA/sparse-2g" "$DATA/sparse-8g" "$DATA/sparse-70b"
fi
