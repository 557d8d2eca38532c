#!/usr/bin/env bash
# Compares gradmerge with mergekit on one synthetic bf16 family: time and peak RSS
# (/usr/bin/time -v) of linear, task_arithmetic and ties, and a check that the outputs
# agree within one bf16 ulp. For benchmarking by hand, not for CI: it creates a venv and
# pip-installs mergekit with PyPI's torch wheel, about 6 GB.
#
#   benches/mergekit_compare.sh                    # 0.46 GB per model
#   GEN_ARGS="--preset llama-7b --layers 4" benches/mergekit_compare.sh   # 2.1 GB
#
# mergekit runs with `dtype: float32`, because it otherwise computes in the config's dtype
# (often bf16) and cannot agree with an f32 computation. At the TIES top-k threshold it
# breaks ties in an unspecified order, so a few ties elements may differ by more.
# NOTE: the install step has run on the development machine, the comparison itself has not.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA=${DATA:-$ROOT/../bench-data}
VENV=${VENV:-$DATA/mergekit-venv}
GEN_ARGS=${GEN_ARGS:---preset llama-7b --scale 2 --layers 2}
FAMILY=$DATA/mergekit-family
WORK=$DATA/mergekit-compare
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

df -h "$DATA" >&2 || mkdir -p "$DATA"
if [ ! -x "$VENV/bin/mergekit-yaml" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet mergekit
fi
cargo build --release --manifest-path "$ROOT/Cargo.toml" >&2
BIN=$CARGO_TARGET_DIR/release/gradmerge
if [ ! -d "$FAMILY" ]; then
    # shellcheck disable=SC2086
    "$BIN" bench generate --out "$FAMILY" --no-fishers $GEN_ARGS >&2
fi
rm -rf "$WORK"
mkdir -p "$WORK"
cat "$FAMILY"/*/*.safetensors >/dev/null

write_config() {
    local method=$1 file=$2
    {
        echo "merge_method: $method"
        if [ "$method" != linear ]; then
            echo "base_model: $FAMILY/base"
        fi
        echo "models:"
        for m in 1 2; do
            echo "  - model: $FAMILY/model-$m"
            echo "    parameters:"
            echo "      weight: 0.5"
            if [ "$method" = ties ]; then
                echo "      density: 0.5"
            fi
        done
        echo "dtype: float32"
        echo "out_dtype: bfloat16"
    } >"$file"
}

# timed NAME COMMAND...: runs the command under /usr/bin/time -v and prints one line.
timed() {
    local name=$1
    shift
    /usr/bin/time -v "$@" 2>"$WORK/$name.time" >/dev/null
    local secs rss
    secs=$(awk -F': ' '/Elapsed \(wall clock\)/ {print $2}' "$WORK/$name.time")
    rss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$WORK/$name.time")
    echo "| $name | $secs | $((rss / 1024)) |"
}

echo "| run | wall time (m:ss) | peak RSS MiB |"
echo "|---|---|---|"
for method in linear task_arithmetic ties; do
    write_config "$method" "$WORK/$method.yml"
    timed "mergekit/$method" "$VENV/bin/mergekit-yaml" "$WORK/$method.yml" "$WORK/mergekit-$method"
    timed "gradmerge/$method" "$BIN" merge -q "$WORK/$method.yml" --out "$WORK/gradmerge-$method"
done

for method in linear task_arithmetic ties; do
    "$VENV/bin/python" - "$WORK/mergekit-$method" "$WORK/gradmerge-$method" "$method" <<'EOF'
import glob, sys
import torch
from safetensors.torch import load_file

def load(folder):
    out = {}
    for f in sorted(glob.glob(folder + "/*.safetensors")):
        out.update(load_file(f))
    return out

a, b, method = load(sys.argv[1]), load(sys.argv[2]), sys.argv[3]
assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
worst, over, total = 0, 0, 0
for name in a:
    x = a[name].to(torch.bfloat16).view(torch.int16).to(torch.int32)
    y = b[name].to(torch.bfloat16).view(torch.int16).to(torch.int32)
    # bf16 patterns of the same sign are ordered like integers: the difference counts ulps.
    d = (x - y).abs()
    worst = max(worst, int(d.max()))
    over += int((d > 1).sum())
    total += d.numel()
print(f"{method}: {total} values, max difference {worst} ulp, {over} differ by more than 1 ulp")
EOF
done
