#!/usr/bin/env bash
# Compares gradmerge with mergekit on one synthetic bf16 family. It prints the median wall
# time and peak RSS (/usr/bin/time -v) of RUNS runs of linear, task_arithmetic and ties with
# a warm page cache, and checks that the outputs agree within one bf16 ulp. For benchmarking
# by hand, not for CI: it creates a venv and pip-installs mergekit with PyPI's torch wheel,
# about 6 GB.
#
#   benches/mergekit_compare.sh                         # 0.97 GB per model
#   GEN_ARGS="--preset llama-7b --layers 4" benches/mergekit_compare.sh   # 2.14 GB
#   TOOLS=mergekit benches/mergekit_compare.sh          # time one tool, keep the other's runs
#   GRADMERGE_BIN=path/to/gradmerge benches/mergekit_compare.sh   # skip the cargo build
#
# mergekit runs with `dtype: float32`, because it otherwise computes in the config's dtype
# (often bf16) and cannot agree with an f32 computation. At the TIES top-k threshold it
# breaks ties in an unspecified order (torch.argsort), so the check counts the elements
# whose task-vector magnitude equals a model's threshold apart from the others.
# docs/BENCHMARKS.md ("Against mergekit") has results of this script with mergekit 0.1.5
# and the exact commands.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DATA=${DATA:-$ROOT/../bench-data}
VENV=${VENV:-$DATA/mergekit-venv}
GEN_ARGS=${GEN_ARGS:---preset llama-7b --scale 2 --layers 7}
RUNS=${RUNS:-3}
TOOLS=${TOOLS:-mergekit gradmerge}
METHODS=${METHODS:-linear task_arithmetic ties}
DENSITY=0.5
FAMILY=$DATA/mergekit-family
WORK=$DATA/mergekit-compare
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}

mkdir -p "$DATA" "$WORK"
df -h "$DATA" >&2
if [ ! -x "$VENV/bin/mergekit-yaml" ]; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet mergekit
fi
echo "mergekit $("$VENV/bin/pip" show mergekit | awk '/^Version:/ {print $2}')," \
    "torch $("$VENV/bin/python" -c 'import torch; print(torch.__version__)')" >&2
if [ -n "${GRADMERGE_BIN:-}" ]; then
    BIN=$GRADMERGE_BIN
else
    cargo build --release --manifest-path "$ROOT/Cargo.toml" >&2
    BIN=$CARGO_TARGET_DIR/release/gradmerge
    echo "gradmerge built from $ROOT at $(git -C "$ROOT" log -1 --format='%h %s')" >&2
    # NOTE: the build includes uncommitted changes in $ROOT. To time a commit alone, build
    # it from a clean checkout and pass GRADMERGE_BIN.
fi
if [ ! -d "$FAMILY" ]; then
    # shellcheck disable=SC2086
    "$BIN" bench generate --out "$FAMILY" --no-fishers $GEN_ARGS >&2
fi
du -sh "$FAMILY"/* >&2

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
                echo "      density: $DENSITY"
            fi
        done
        echo "dtype: float32"
        echo "out_dtype: bfloat16"
    } >"$file"
}

# Prints the seconds and the peak RSS in KiB that a `/usr/bin/time -v` report contains.
parse_time_report() {
    awk -F': ' '
        /Elapsed \(wall clock\)/ {
            n = split($2, part, ":")
            secs = 0
            for (i = 1; i <= n; i++) secs = secs * 60 + part[i]
        }
        /Maximum resident set size/ { rss = $2 }
        END { printf "%.2f\t%d\n", secs, rss }
    ' "$1"
}

# Runs one merge under /usr/bin/time -v into a fresh output folder and appends
# "method run seconds rss_kib" to $WORK/runs-TOOL.tsv.
time_merge() {
    local tool=$1 method=$2 run=$3 out=$WORK/$1-$2
    local report=$WORK/$tool-$method-$run.time
    rm -rf "$out"
    local cmd
    if [ "$tool" = mergekit ]; then
        # HF_HUB_OFFLINE keeps mergekit and transformers from asking the Hugging Face Hub
        # about the local model folders. The family has no tokenizer, and without
        # --no-copy-tokenizer mergekit tries to load one, logs a traceback and goes on.
        cmd=(env HF_HUB_OFFLINE=1 "$VENV/bin/mergekit-yaml" --quiet --no-copy-tokenizer
            "$WORK/$method.yml" "$out")
    else
        cmd=("$BIN" merge -q "$WORK/$method.yml" --out "$out")
    fi
    if ! /usr/bin/time -v "${cmd[@]}" >"$WORK/$tool-$method-$run.log" 2>"$report"; then
        echo "$tool $method run $run failed:" >&2
        tail -n 20 "$report" "$WORK/$tool-$method-$run.log" >&2
        exit 1
    fi
    printf '%s\t%s\t%s\n' "$method" "$run" "$(parse_time_report "$report")" \
        >>"$WORK/runs-$tool.tsv"
    echo "$tool $method run $run: $(tail -n 1 "$WORK/runs-$tool.tsv" | cut -f 3-4) (s, KiB)" >&2
}

# Prints the median of column COLUMN (3: seconds, 4: RSS KiB) of TOOL's runs of METHOD.
median() {
    local tool=$1 method=$2 column=$3 file=$WORK/runs-$1.tsv
    [ -f "$file" ] || { echo "-"; return; }
    awk -F'\t' -v m="$method" -v c="$column" '$1 == m { print $c }' "$file" | sort -g |
        awk '{ v[NR] = $1 } END {
            if (NR == 0) print "-"
            else if (NR % 2) print v[(NR + 1) / 2]
            else print (v[NR / 2] + v[NR / 2 + 1]) / 2
        }'
}

for method in $METHODS; do
    write_config "$method" "$WORK/$method.yml"
done
for tool in $TOOLS; do
    rm -f "$WORK/runs-$tool.tsv"
    cat "$FAMILY"/*/*.safetensors >/dev/null
    for method in $METHODS; do
        for run in $(seq 1 "$RUNS"); do
            time_merge "$tool" "$method" "$run"
        done
    done
done

echo "| method | mergekit s | gradmerge s | ratio | mergekit peak RSS MiB | gradmerge peak RSS MiB |"
echo "|---|---|---|---|---|---|"
for method in $METHODS; do
    mk_s=$(median mergekit "$method" 3)
    gm_s=$(median gradmerge "$method" 3)
    mk_rss=$(median mergekit "$method" 4)
    gm_rss=$(median gradmerge "$method" 4)
    awk -v m="$method" -v mk_s="$mk_s" -v gm_s="$gm_s" -v mk_rss="$mk_rss" -v gm_rss="$gm_rss" '
        function mib(kib) { return (kib != "-") ? sprintf("%d", kib / 1024) : "-" }
        BEGIN {
            ratio = (mk_s != "-" && gm_s != "-" && gm_s > 0) ? sprintf("%.1f", mk_s / gm_s) : "-"
            printf "| %s | %s | %s | %s | %s | %s |\n", m, mk_s, gm_s, ratio, mib(mk_rss), mib(gm_rss)
        }'
done

for method in $METHODS; do
    if [ ! -d "$WORK/mergekit-$method" ] || [ ! -d "$WORK/gradmerge-$method" ]; then
        echo "$method: no output of both tools, agreement not checked" >&2
        continue
    fi
    "$VENV/bin/python" - "$WORK/mergekit-$method" "$WORK/gradmerge-$method" "$method" \
        "$FAMILY" "$DENSITY" <<'EOF'
import glob
import sys

import torch
from safetensors import safe_open


def open_folder(folder):
    """Map each tensor name to the safetensors file in FOLDER that contains it."""
    files = {}
    for path in sorted(glob.glob(folder + "/*.safetensors")):
        with safe_open(path, "pt") as f:
            for name in f.keys():
                files[name] = path
    return files


def read(files, name):
    with safe_open(files[name], "pt") as f:
        return f.get_tensor(name)


def ordered_bits(t):
    """bf16 bit patterns as integers ordered like the values: the difference counts ulps."""
    bits = t.to(torch.bfloat16).view(torch.int16).to(torch.int32)
    magnitude = bits & 0x7FFF
    return torch.where(bits < 0, -magnitude, magnitude)


def threshold_ties(base, models, density):
    """Mark the elements whose abs(task vector) equals a model's top-k threshold when more
    than k elements reach it, so the kept set depends on how the sort breaks ties."""
    n = base.numel()
    k = max(1, int(density * n))
    marked = torch.zeros(n, dtype=torch.bool)
    for model in models:
        magnitude = (model.float() - base.float()).abs().reshape(-1)
        threshold = torch.kthvalue(magnitude, n - k + 1).values
        at_threshold = magnitude == threshold
        if int((magnitude >= threshold).sum()) > k:
            marked |= at_threshold
    return marked


mergekit_dir, gradmerge_dir, method, family, density = sys.argv[1:6]
density = float(density)
mergekit_files, gradmerge_files = open_folder(mergekit_dir), open_folder(gradmerge_dir)
assert mergekit_files.keys() == gradmerge_files.keys(), sorted(
    set(mergekit_files) ^ set(gradmerge_files)
)
inputs = {}
if method == "ties":
    inputs = {m: open_folder(f"{family}/{m}") for m in ("base", "model-1", "model-2")}

total = over = worst = 0
tied = over_tied = worst_untied = 0
for name in sorted(mergekit_files):
    x, y = read(mergekit_files, name), read(gradmerge_files, name)
    assert x.shape == y.shape, (name, x.shape, y.shape)
    d = (ordered_bits(x) - ordered_bits(y)).abs().reshape(-1)
    total += d.numel()
    over += int((d > 1).sum())
    worst = max(worst, int(d.max()))
    if method == "ties":
        base = read(inputs["base"], name)
        models = [read(inputs[m], name) for m in ("model-1", "model-2")]
        marked = threshold_ties(base, models, density)
        tied += int(marked.sum())
        over_tied += int(((d > 1) & marked).sum())
        untied = d[~marked]
        if untied.numel():
            worst_untied = max(worst_untied, int(untied.max()))

line = f"{method}: {total} values, max difference {worst} ulp, {over} differ by more than 1 ulp"
if method == "ties":
    line += (
        f"; {tied} values at a top-k threshold tie, {over_tied} of them differ by more than"
        f" 1 ulp; elsewhere max difference {worst_untied} ulp,"
        f" {over - over_tied} differ by more than 1 ulp"
    )
print(line)
EOF
done
