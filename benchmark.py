"""The benchmark run: the three scripts with their default constants, from an empty output folder, timed,
then the figures of results.json checked against the targets the project promises for the run's profile.

    DATA_DIR=/path/to/cifar10 python benchmark.py [--OUT_DIR=runs_benchmark] [--NAME=VALUE ...]

Before the scripts, it times a fixed reference workload (training steps of torchvision's stock resnet18 on
random 32x32 batches, on the run's device) so that run times from different machines can be compared.
Each other flag goes to the scripts whose constants include it (e.g. --PROFILE=gpu to all three, --EPOCHS=5 to
train_baseline.py only); a flag no script knows is an error. Writes OUT_DIR/benchmark.json and prints, per
training stage, its epochs, seconds, images per second and final validation accuracy (from metrics.jsonl).
"""
import json
import os
import platform
import subprocess
import sys
import time

import compress_model
import evaluate_results
import train_baseline
from utils.config import UserError, parse_value, run_cli, script_constants
from utils.files import atomic_write_text
from utils.plots import read_metrics

# -----------------------------------------------------------------------------------------------
OUT_DIR = "runs_benchmark"   # an empty (or new) folder for this run
REFERENCE_SECONDS = 30.0     # seconds of the reference workload (0 = skip it)
# -----------------------------------------------------------------------------------------------
SCRIPTS = {"train_baseline.py": train_baseline, "compress_model.py": compress_model,
           "evaluate_results.py": evaluate_results}
# (description, test on rows by stage, timing and the search's summary in results.json) per profile
COMMON_TARGETS = [
    ("the search within its budget (MAX_ACC_DROP, paired 95% bound on validation)", lambda r, t, s: s["budget_met"]),
    ("int8 and int8.sparse test accuracy within MAX_ACC_DROP of the baseline",
     lambda r, t, s: max(r["int8"]["accuracy_drop"], r["int8_sparse"]["accuracy_drop"]) <= s["max_acc_drop"]),
    ("the shipped model pruned (fewer nonzero weights than the student)",
     lambda r, t, s: r["pruned"]["nonzero_params"] < r["student"]["nonzero_params"]),
    ("the distilled student at least as accurate on test as the scratch control",
     lambda r, t, s: "scratch" in r and r["student"]["accuracy"] >= r["scratch"]["accuracy"]),
]
TARGETS = {
    "cpu": [("three scripts within 75 minutes (the scratch control apart)", lambda r, t, s: t["total_s"] <= 75 * 60),
            ("int8.sparse <= 0.25 MiB", lambda r, t, s: r["int8_sparse"]["size_bytes"] <= 0.25 * 2**20),
            ("int8 >= 5x faster at batch 1, same runtime", lambda r, t, s: r["int8"]["speedup_b1"] >= 5.0),
            ("int8 >= 5x faster at batch 64, same runtime", lambda r, t, s: r["int8"]["speedup_b64"] >= 5.0)]
           + COMMON_TARGETS,
    "gpu": [("three scripts within 10 minutes (the scratch control apart)", lambda r, t, s: t["total_s"] <= 10 * 60),
            ("baseline training within 3 minutes", lambda r, t, s: t["train_baseline.py_s"] <= 3 * 60),
            ("baseline test accuracy >= 94%", lambda r, t, s: r["baseline"]["accuracy"] >= 94.0),
            ("int8 >= 3x faster at batch 1, same runtime", lambda r, t, s: r["int8"]["speedup_b1"] >= 3.0),
            ("int8 >= 3x faster at batch 64, same runtime", lambda r, t, s: r["int8"]["speedup_b64"] >= 3.0)]
           + COMMON_TARGETS,
}


def route_flags(argv):
    """({script: [its flags]}, benchmark's own constants): each flag to every script that knows its name."""
    own = {"OUT_DIR": OUT_DIR, "REFERENCE_SECONDS": REFERENCE_SECONDS}
    routed = {script: [] for script in SCRIPTS}
    args = list(argv)
    while args:
        arg = args.pop(0)
        name, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if not name or not sep:
            raise UserError(f"unexpected argument {arg!r}; flags look like --NAME=VALUE")
        if name in own:
            own[name] = parse_value(name, value, own[name])
            continue
        known = [script for script, module in SCRIPTS.items() if name in script_constants(vars(module))]
        if not known:
            raise UserError(f"unknown constant --{name}: no script has it")
        for script in known:
            routed[script].append(arg)
    return routed, own


def stage_speeds(out):
    """Per training stage: epochs, seconds, mean images per second, last validation accuracy (metrics.jsonl)."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    return {stage: {"epochs": len(rs), "seconds": round(sum(r["seconds"] for r in rs), 1),
                    "images_per_s": round(sum(r["images_per_s"] for r in rs) / len(rs), 1),
                    "val_accuracy": rs[-1]["val_accuracy"]} for stage, rs in read_metrics(path).items()}


def reference_workload(seconds, profile_flags):
    """Images per second of the reference workload on the run's device (cuda when present unless --DEVICE=cpu)."""
    if seconds <= 0:
        return None
    import torch
    from utils.measure import reference_speed
    device = "cuda" if torch.cuda.is_available() and "--DEVICE=cpu" not in profile_flags else "cpu"
    speed = reference_speed(seconds, device=device)
    print(f"benchmark: reference workload (stock resnet18 training steps, batch 256, 32x32, {device}, "
          f"{torch.get_num_threads()} threads): {speed:.0f} images/s", flush=True)
    return {"images_per_s": round(speed, 1), "device": device, "seconds": seconds}


def main(argv):
    routed, own = route_flags(argv)
    out = own["OUT_DIR"]
    if os.path.exists(os.path.join(out, "baseline.pth")):
        raise UserError(f"{out} already holds a run; the benchmark starts from an empty folder")
    reference = reference_workload(own["REFERENCE_SECONDS"], routed["train_baseline.py"])
    timing = {}
    for script, flags in routed.items():
        t0 = time.time()
        proc = subprocess.run([sys.executable, script, f"--OUT_DIR={out}"] + flags)
        if proc.returncode:
            raise UserError(f"{script} failed with exit status {proc.returncode}")
        timing[f"{script}_s"] = round(time.time() - t0, 1)
        print(f"benchmark: {script} took {timing[f'{script}_s']:.0f}s", flush=True)
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    # the scratch control runs inside compress_model.py but is no part of the pipeline: its time is reported apart
    seconds = results["search"]["seconds"]
    timing["scratch_control_s"] = round(seconds.get("scratch_control", 0.0), 1)
    timing["compress_model.py_s"] = round(timing["compress_model.py_s"] - timing["scratch_control_s"], 1)
    timing["total_s"] = round(sum(timing[f"{script}_s"] for script in SCRIPTS), 1)
    rows = {r["stage"]: r for r in results["rows"]}
    profile = results["config"]["PROFILE"]
    checks = [{"target": name, "met": bool(test(rows, timing, results["search"]))} for name, test in TARGETS[profile]]
    search_s = seconds["sensitivity_and_search"]
    timing["sensitivity_and_search_s"] = round(search_s, 1)
    speeds = stage_speeds(out)
    print(f"benchmark: total {timing['total_s'] / 60:.1f} min (the scratch control "
          f"{timing['scratch_control_s'] / 60:.1f} min more) on {results['machine']['cpu']} "
          f"({os.cpu_count()} cores{', ' + results['machine']['gpu'] if 'gpu' in results['machine'] else ''}), "
          f"{profile} profile, of which sensitivity analysis and search {search_s / 60:.1f} min")
    for stage, s in speeds.items():
        print(f"  {stage:<12} {s['epochs']:>3} epochs {s['seconds']:8.1f}s {s['images_per_s']:8.0f} img/s  "
              f"val {s['val_accuracy']:.2f}%")
    for stage, row in rows.items():
        print(f"  {stage:<12} test {row['accuracy']:.2f}%  {row['size_bytes'] / 2**20:8.3f} MiB  "
              f"b1 {row['latency_b1_ms']:.3f} ms  b64 {row['latency_b64_ms']:.2f} ms")
    for c in checks:
        print(f"  [{'met' if c['met'] else 'MISSED'}] {c['target']}")
    atomic_write_text(os.path.join(out, "benchmark.json"), json.dumps(
        {"timing": timing, "checks": checks, "profile": profile, "reference_workload": reference,
         "stage_speeds": speeds, "command": " ".join([sys.argv[0]] + argv),
         "DATA_DIR": os.environ.get("DATA_DIR", ""), "host": platform.node(), "results": results}, indent=2))


if __name__ == "__main__":
    run_cli(main)
