"""The benchmark run: the three scripts with their default constants, from an empty output folder, timed,
then the figures of results.json checked against the targets the project promises.

    DATA_DIR=/path/to/cifar10 python benchmark.py [--OUT_DIR=runs_benchmark] [--NAME=VALUE ...]

Flags other than OUT_DIR go to every script that knows them (e.g. --DATA_DIR). Writes OUT_DIR/benchmark.json.
"""
import json
import os
import platform
import subprocess
import sys
import time

SCRIPTS = ("train_baseline.py", "compress_model.py", "evaluate_results.py")
# (description, test on results + timing)
TARGETS = [
    ("three scripts within 60 minutes", lambda r, t: t["total_s"] <= 60 * 60),
    ("baseline test accuracy >= 82%", lambda r, t: r["baseline"]["accuracy"] >= 82.0),
    ("int8 and int8.sparse test accuracy within 0.5 points of the baseline",
     lambda r, t: max(r["int8"]["accuracy_drop"], r["int8_sparse"]["accuracy_drop"]) <= 0.5),
    ("int8.sparse >= 25x smaller than the baseline checkpoint", lambda r, t: r["int8_sparse"]["size_ratio"] >= 25.0),
    ("int8 >= 3x faster at batch 1, same runtime", lambda r, t: r["int8"]["speedup_b1"] >= 3.0),
    ("int8 >= 3x faster at batch 64, same runtime", lambda r, t: r["int8"]["speedup_b64"] >= 3.0),
]


def main(argv):
    out = next((a.split("=", 1)[1] for a in argv if a.startswith("--OUT_DIR=")), "runs_benchmark")
    passed = [a for a in argv if not a.startswith("--OUT_DIR=")]
    if os.path.exists(os.path.join(out, "baseline.pth")):
        sys.exit(f"error: {out} already holds a run; the benchmark starts from an empty folder")
    timing = {}
    for script in SCRIPTS:
        t0 = time.time()
        proc = subprocess.run([sys.executable, script, f"--OUT_DIR={out}"] + passed)
        if proc.returncode:
            sys.exit(f"error: {script} failed with exit status {proc.returncode}")
        timing[f"{script}_s"] = round(time.time() - t0, 1)
        print(f"benchmark: {script} took {timing[f'{script}_s']:.0f}s", flush=True)
    timing["total_s"] = round(sum(timing.values()), 1)
    results = json.load(open(os.path.join(out, "results.json")))
    rows = {r["stage"]: r for r in results["rows"]}
    checks = [{"target": name, "met": bool(test(rows, timing))} for name, test in TARGETS]
    search_s = results["search"]["seconds"]["sensitivity_and_search"]
    timing["sensitivity_and_search_s"] = round(search_s, 1)
    print(f"benchmark: total {timing['total_s'] / 60:.1f} min on {results['machine']['cpu']} "
          f"({os.cpu_count()} cores), of which sensitivity analysis and search {search_s / 60:.1f} min")
    for c in checks:
        print(f"  [{'met' if c['met'] else 'MISSED'}] {c['target']}")
    with open(os.path.join(out, "benchmark.json"), "w") as f:
        json.dump({"timing": timing, "checks": checks, "command": " ".join([sys.argv[0]] + argv),
                   "DATA_DIR": os.environ.get("DATA_DIR", ""),
                   "host": platform.node(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
