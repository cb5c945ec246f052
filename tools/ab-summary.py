#!/usr/bin/env python3
"""Summarizes an A/B of `vkflex bench --json` runs: BEFORE... -- AFTER... (JSON lines files).
Per case (name, D, dtype; decode rows also paged or not): the median fw_tflops of each side over
its runs (decode rows: GB/s; runs with --backward add a "backward" row per case, bw_tflops),
after/before, and the geometric mean of the ratios — the figures issue 19's "no speed lost" rule
reads (>= 0.99 mean, no case below 0.97)."""
import json, math, statistics, sys

args = sys.argv[1:]
if "--" not in args:
    sys.exit("usage: ab-summary.py BEFORE.jsonl... -- AFTER.jsonl...")
cut = args.index("--")
sides = {"before": args[:cut], "after": args[cut + 1:]}
tflops = {"before": {}, "after": {}}
for side, files in sides.items():
    for path in files:
        for line in open(path):
            if not line.strip():
                continue
            r = json.loads(line)
            decode = "gbps" in r
            key = (r["case"] + (" paged" if r.get("paged") else ""), r["D"], r.get("dtype", "float16"))
            tflops[side].setdefault(key, []).append(r["gbps"] if decode else r["fw_tflops"])
            if "bw_tflops" in r:
                tflops[side].setdefault((key[0] + " backward",) + key[1:], []).append(r["bw_tflops"])
print("| case | D | dtype | before TFLOP/s or GB/s (median) | after (median) | after/before |")
print("|---|---|---|---|---|---|")
ratios = []
for key in sorted(set(tflops["before"]) & set(tflops["after"])):
    b, a = statistics.median(tflops["before"][key]), statistics.median(tflops["after"][key])
    ratio = a / b if b > 0 else float("nan")
    ratios.append(ratio)
    print(f"| {key[0]} | {key[1]} | {key[2]} | {b:.1f} | {a:.1f} | {ratio:.3f} |")
if ratios:
    geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
    print(f"\ngeometric mean after/before: {geo:.3f}; lowest: {min(ratios):.3f} "
          f"({'meets' if geo >= 0.99 and min(ratios) >= 0.97 else 'misses'} >= 0.99 and >= 0.97)")
