"""Markdown table of benchmarks/results/overhead.jsonl (the latest run of each engine x workload)."""

import json
import sys


def main(path: str) -> None:
    latest = {}
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            latest[(row["workload"], row["engine"])] = row
    print("| workload | engine | base ms/update | AdaScale / base (95% CI) | fairscale / base (95% CI) | AdaScale / fairscale (95% CI) | extra bytes allocated per update | collectives added per update |")
    print("|---|---|---|---|---|---|---|---|")
    for (workload, engine), row in sorted(latest.items()):
        ours = row["ratio"]["adascale"]
        theirs = row["ratio"].get("fairscale")
        extra = row["allocated_bytes_per_update"]["adascale"] - row["allocated_bytes_per_update"]["base"]
        added = row["collectives_per_update"]["adascale"]
        base = row["collectives_per_update"]["base"]
        calls = {k: v - base["calls"].get(k, 0) for k, v in added["calls"].items() if v - base["calls"].get(k, 0)}
        nbytes = {k: v - base["bytes"].get(k, 0) for k, v in added["bytes"].items() if v - base["bytes"].get(k, 0)}
        coll = ", ".join(f"{n} {k} ({nbytes.get(k, 0)} B)" for k, n in calls.items()) or "none"
        fair = f"{theirs['mean']:.3f} [{theirs['ci95'][0]:.3f}, {theirs['ci95'][1]:.3f}]" if theirs else "-"
        duel = row["ratio"].get("adascale/fairscale")
        duel = f"{duel['mean']:.3f} [{duel['ci95'][0]:.3f}, {duel['ci95'][1]:.3f}]" if duel else "-"
        if theirs:
            fair_extra = row["allocated_bytes_per_update"]["fairscale"] - row["allocated_bytes_per_update"]["base"]
            fair += f"; +{fair_extra / 1e6:.1f} MB"
        print(
            f"| {workload} | {engine} | {row['median_ms']['base']:.1f} | {ours['mean']:.3f} [{ours['ci95'][0]:.3f}, "
            f"{ours['ci95'][1]:.3f}] | {fair} | {duel} | {extra:+,} | {coll} |"
        )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/overhead.jsonl")
