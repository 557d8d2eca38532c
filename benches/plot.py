#!/usr/bin/env python3
"""Plot median read throughput and peak RSS against model size from the results.jsonl
that benches/e2e.sh writes, for the sink runs (no disk writes).

Usage: plot.py RESULTS.jsonl OUT.png   (needs matplotlib)
"""

import json
import statistics
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(path, out):
    runs = defaultdict(list)
    for line in open(path):
        r = json.loads(line)
        # A --max-tensors run writes only headers to the sink, so it has no model size.
        if not r["label"].endswith("/sink") or r["bytes_written"] < r["bytes_read"] / 100:
            continue
        # The output size of a full run is the model size.
        size_gb = r["bytes_written"] / 1e9
        runs[(r["workload"], r["bytes_read"])].append((size_gb, r))

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for workload, marker in [("copy", "s"), ("task_arithmetic", "o"), ("ties", "^"), ("gradmatch", "D")]:
        points = []
        for (w, _), rs in runs.items():
            if w != workload:
                continue
            size = rs[0][0]
            seconds = statistics.median(r["seconds"] for _, r in rs)
            read = rs[0][1]["bytes_read"]
            rss = max(r["peak_rss_bytes"] for _, r in rs) / 2**20
            points.append((size, read / seconds / 1e9, rss))
        if not points:
            continue
        points.sort()
        xs = [p[0] for p in points]
        left.plot(xs, [p[1] for p in points], marker=marker, label=workload)
        right.plot(xs, [p[2] for p in points], marker=marker, label=workload)

    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xlabel("model size merged (GB of output, bf16)")
        ax.grid(True, which="both", alpha=0.3)
    left.set_ylabel("input read throughput (GB/s, median)")
    left.set_title("Throughput, sink output, 2 threads")
    right.set_ylabel("peak RSS (MiB)")
    right.set_title("Peak RSS (VmHWM), default 256 MiB budget")
    right.axhline(512, color="gray", linestyle="--", linewidth=1)
    left.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
