#!/usr/bin/env python3
"""Plot median read throughput and peak RSS against model size from the results.jsonl
that benches/e2e.sh writes, for the sink runs (no disk writes). Throughput uses the
dense families only; peak RSS shows the sparse families too.

Usage: plot.py RESULTS.jsonl OUT.png   (needs matplotlib)
"""

import json
import statistics
import sys
from collections import defaultdict

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path, out):
    runs = defaultdict(list)
    for line in open(path):
        r = json.loads(line)
        # A --max-tensors run writes only headers to the sink, so it has no model size.
        if not r["label"].endswith("/sink") or r["bytes_written"] < r["bytes_read"] / 100:
            continue
        # Sparse families are holes that read as zeros: they show memory, not throughput.
        sparse = r["label"].startswith("sparse")
        runs[(r["workload"], sparse, r["bytes_read"])].append(r)

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    workloads = [
        ("copy", "s"),
        ("task_arithmetic", "o"),
        ("task_arithmetic (tiles)", "x"),
        ("ties", "^"),
        ("gradmatch", "D"),
        ("gradmatch (tiles)", "+"),
    ]
    for workload, marker in workloads:
        for sparse in (False, True):
            points = []
            for (w, s, _), rs in runs.items():
                if w != workload or s != sparse:
                    continue
                # The output size of a full run is the model size.
                size = rs[0]["bytes_written"] / 1e9
                seconds = statistics.median(r["seconds"] for r in rs)
                rss = max(r["peak_rss_bytes"] for r in rs) / 2**20
                points.append((size, rs[0]["bytes_read"] / seconds / 1e9, rss))
            if not points:
                continue
            points.sort()
            xs = [p[0] for p in points]
            if sparse:
                right.plot(xs, [p[2] for p in points], marker=marker, linestyle=":",
                           label=f"{workload}, sparse")
            else:
                left.plot(xs, [p[1] for p in points], marker=marker, label=workload)
                right.plot(xs, [p[2] for p in points], marker=marker, label=workload)

    for ax in (left, right):
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xticks([0.5, 1, 2, 4, 8])
        ax.set_xlabel("model size merged (GB of output, bf16)")
        ax.grid(True, which="both", alpha=0.3)
    left.set_ylabel("input read throughput (GB/s, median)")
    left.set_title("Throughput, dense families, sink output, 2 threads")
    right.set_ylabel("peak RSS (MiB)")
    right.set_title("Peak RSS (VmHWM), default 256 MiB budget")
    right.axhline(512, color="gray", linestyle="--", linewidth=1)
    right.set_ylim(0, 560)
    left.legend(fontsize=8)
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
