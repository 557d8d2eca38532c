#!/usr/bin/env python3
"""Print a Markdown table of medians from the results.jsonl that benches/e2e.sh writes.

Rows are (label, workload). The ratio column divides the copy baseline's median time by
the merge's median time for the same family, output and inputs, so 1.0 means the merge
runs as fast as a streaming copy of its inputs. Usage: summarize.py RESULTS.jsonl
"""

import json
import statistics
import sys
from collections import defaultdict


def main(path):
    runs = defaultdict(list)
    for line in open(path):
        r = json.loads(line)
        runs[(r["label"], r["workload"], r["bytes_read"])].append(r)

    print("| family / output | workload | runs | median s | GB/s read | copy ratio | peak RSS MiB | peak anon MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for (label, workload, read), rs in runs.items():
        seconds = statistics.median(r["seconds"] for r in rs)
        copy = runs.get((label, "copy", read))
        ratio = ""
        if workload != "copy" and copy:
            ratio = "%.2f" % (statistics.median(r["seconds"] for r in copy) / seconds)
        rss = max(r["peak_rss_bytes"] for r in rs) / 2**20
        anon = max(r["peak_anon_rss_bytes"] for r in rs) / 2**20
        print(
            f"| {label} | {workload} | {len(rs)} | {seconds:.2f} | {read / seconds / 1e9:.2f} "
            f"| {ratio} | {rss:.0f} | {anon:.0f} |"
        )


if __name__ == "__main__":
    main(sys.argv[1])
