"""The benchmark run: the three scripts with their default constants, from an empty output folder, timed,
then the figures of results.json checked against the targets the project promises for the run's profile.

    DATA_DIR=/path/to/cifar10 python benchmark.py [--OUT_DIR=runs_benchmark] [--NAME=VALUE ...]

A run may be done in parts (a machine lent for a few minutes per command): --STOP_AFTER=train_baseline.py ends
it after that script, and --RESUME=true goes on with a run this script started and did not finish, whether
stopped so or killed: the scripts it finished are not run again, the one it stopped in resumes from its last
finished epoch and stage. A script's time is that of the command that finished it, so when one was interrupted the
run's time targets are not judged.

--PUBLISH=docs writes docs/results.md from the finished run's files (its command, commit, machine, reference
speed, each script's and stage's time, the targets, the test table and every candidate of the search) and copies
the shipped model and the run's JSON files into docs/results/, so the README's figures can be re-measured.

Before the scripts, it times a fixed reference workload (training steps of torchvision's stock resnet18 on
random 32x32 batches, on the run's device) so that run times from different machines can be compared.
Each other flag goes to the scripts whose constants include it (e.g. --PROFILE=gpu to all three, --EPOCHS=5 to
train_baseline.py only); a flag no script knows is an error. Writes OUT_DIR/benchmark.json and prints, per
training stage, its epochs, seconds, images per second and final validation accuracy (from metrics.jsonl).
"""
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

from utils.config import UserError, config_defaults, config_type, file_constants, parse_value, run_cli
from utils.files import atomic_write_text, write_json
from utils.plots import read_metrics

# -----------------------------------------------------------------------------------------------
OUT_DIR = "runs_benchmark"   # an empty (or new) folder for this run
REFERENCE_SECONDS = 30.0     # seconds of the reference workload (0 = skip it)
RESUME = False               # True: go on with the unfinished run this script started in OUT_DIR (or start one)
STOP_AFTER = ""              # "" | train_baseline.py | compress_model.py: end the run after this script
PUBLISH = ""                 # "" | a folder (e.g. docs): the finished run written up as its results.md, the run's
                             # small files copied into its results/; an OUT_DIR already finished is only published
# -----------------------------------------------------------------------------------------------
Config = config_type("Config", __file__)  # the constants above as a frozen dataclass
HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = ("train_baseline.py", "compress_model.py", "evaluate_results.py")  # run in this order
REFERENCE_SPEED = 1000  # images/s of the reference workload at which the CPU profile's time target holds


@dataclass(frozen=True)
class Target:
    """A promise the run's profile makes: its description, its test on (rows by stage, timing, the search's summary
    in results.json), and whether it judges the run's time (not judged when a script was interrupted)."""
    description: str
    test: Callable
    timed: bool = False


COMMON_TARGETS = [
    Target("the search within its budget (MAX_ACC_DROP, paired 95% bound on validation)",
           lambda r, t, s: s["budget_met"]),
    Target("int8 and int8.sparse test accuracy within MAX_ACC_DROP of the baseline",
           lambda r, t, s: max(r["int8"]["accuracy_drop"], r["int8_sparse"]["accuracy_drop"]) <= s["max_acc_drop"]),
    Target("the shipped model pruned (fewer nonzero weights than the student)",
           lambda r, t, s: r["pruned"]["nonzero_params"] < r["student"]["nonzero_params"]),
    Target("the distilled student at least as accurate on test as the scratch control",
           lambda r, t, s: "scratch" in r and r["student"]["accuracy"] >= r["scratch"]["accuracy"]),
]
TARGETS = {
    "cpu": [Target(f"three scripts within 75 minutes at a reference workload of {REFERENCE_SPEED} images/s (the run's "
                   "time scaled by its reference speed; the scratch control apart)",
                   lambda r, t, s: t["total_s_at_reference"] <= 75 * 60, timed=True),
            Target("baseline test accuracy >= 88.5%", lambda r, t, s: r["baseline"]["accuracy"] >= 88.5),
            Target("shipped INT8 model test accuracy >= 89.0%",
                   lambda r, t, s: min(r["int8"]["accuracy"], r["int8_sparse"]["accuracy"]) >= 89.0),
            Target("int8.sparse <= 0.17 MiB", lambda r, t, s: r["int8_sparse"]["size_bytes"] <= 0.17 * 2**20),
            # no batch-1 target: ONNX Runtime's per-operator overhead, which batch 1 measures, differs from machine
            # to machine more than the model does (the same two files: 13.7x on one EPYC, 11.2x on another)
            Target("int8 >= 7x faster at batch 64, same runtime", lambda r, t, s: r["int8"]["speedup_b64"] >= 7.0)]
           + COMMON_TARGETS,
    "gpu": [Target("three scripts within 10 minutes (the scratch control apart)",
                   lambda r, t, s: t["total_s"] <= 10 * 60, timed=True),
            Target("baseline training within 3 minutes", lambda r, t, s: t["train_baseline.py_s"] <= 3 * 60,
                   timed=True),
            Target("baseline test accuracy >= 94%", lambda r, t, s: r["baseline"]["accuracy"] >= 94.0),
            Target("int8 >= 3x faster at batch 1, same runtime", lambda r, t, s: r["int8"]["speedup_b1"] >= 3.0),
            Target("int8 >= 3x faster at batch 64, same runtime", lambda r, t, s: r["int8"]["speedup_b64"] >= 3.0),
            # the full ResNet-18 teacher (CIFAR stem) is the GPU profile's: the gain over the control is asked here
            Target("the distilled student at least 0.5 points over the scratch control on test",
                   lambda r, t, s: "scratch" in r and r["student"]["gain_over_scratch"] >= 0.5)]
           + COMMON_TARGETS,
}


def route_flags(argv):
    """({script: [its flags]}, this script's own configuration): each flag to every script that knows its name."""
    own = config_defaults(Config)
    routed = {script: [] for script in SCRIPTS}
    constants = {script: file_constants(os.path.join(HERE, script)) for script in SCRIPTS}
    args = list(argv)
    while args:
        arg = args.pop(0)
        name, sep, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if not name or not sep:
            raise UserError(f"unexpected argument {arg!r}; flags look like --NAME=VALUE")
        if name in own:
            own[name] = parse_value(name, value, own[name])
            continue
        known = [script for script in SCRIPTS if name in constants[script]]
        if not known:
            raise UserError(f"unknown constant --{name}: no script has it")
        for script in known:
            routed[script].append(arg)
    return routed, Config(**own)


def stage_speeds(out):
    """Per training stage: epochs, seconds, mean images per second, last validation accuracy and, on a GPU, peak
    GPU memory (metrics.jsonl)."""
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    speeds = {}
    for stage, rs in read_metrics(path).items():
        speeds[stage] = {"epochs": len(rs), "seconds": round(sum(r["seconds"] for r in rs), 1),
                         "images_per_s": round(sum(r["images_per_s"] for r in rs) / len(rs), 1),
                         "val_accuracy": rs[-1]["val_accuracy"]}
        if "peak_gpu_mib" in rs[-1]:  # training on a GPU
            speeds[stage]["peak_gpu_mib"] = max(r["peak_gpu_mib"] for r in rs)
    return speeds


def run_device(profile_flags):
    """The run's device: cuda when present unless --DEVICE=cpu."""
    import torch
    return "cuda" if torch.cuda.is_available() and "--DEVICE=cpu" not in profile_flags else "cpu"


def environment(device):
    """The versions the run uses and its device, printed first: a lent machine's log says at once what it has."""
    import importlib.metadata
    import onnxruntime
    import torch
    cuda = device == "cuda"
    env = {"torch": str(torch.__version__), "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
           "onnxruntime": onnxruntime.__version__, "torch-pruning": importlib.metadata.version("torch-pruning"),
           "device": torch.cuda.get_device_name(0) if cuda else "cpu", "bf16": cuda and torch.cuda.is_bf16_supported()}
    print("benchmark: " + ", ".join(f"{name} {value}" for name, value in env.items()), flush=True)
    return env


def reference_workload(seconds, device):
    """Images per second of the reference workload on the run's device."""
    if seconds <= 0:
        return None
    import torch
    from utils.measure import reference_speed
    speed = reference_speed(seconds, device=device)
    print(f"benchmark: reference workload (stock resnet18 training steps, batch 256, 32x32, {device}, "
          f"{torch.get_num_threads()} threads): {speed:.0f} images/s", flush=True)
    return {"images_per_s": round(speed, 1), "device": device, "seconds": seconds}


PROGRESS_FILE = "benchmark_progress.json"  # in OUT_DIR: the run's flags, reference speed, finished scripts' times


def start_or_resume(out, argv, own, device):
    """The run's progress ({"argv", "environment", "reference", "timing", "running", "interrupted"}): a new one
    (OUT_DIR must not hold a run), or with RESUME the one this script left in OUT_DIR, which must have been started
    with the same flags; "running" names a script that started and did not finish, which makes the run
    "interrupted"."""
    path = os.path.join(out, PROGRESS_FILE)
    run_flags = [a for a in argv if a.partition("=")[0] not in ("--RESUME", "--STOP_AFTER", "--PUBLISH")]
    env = environment(device)  # printed by every command; a resumed run keeps its first command's
    if own.RESUME and os.path.exists(path):
        with open(path) as f:
            progress = json.load(f)
        if progress["argv"] != run_flags:
            raise UserError(f"{out} holds a run started with {' '.join(progress['argv']) or 'no flags'}; resume it "
                            f"with the same flags (besides --RESUME and --STOP_AFTER)")
        if "evaluate_results.py_s" in progress["timing"]:
            raise UserError(f"{out} holds a finished run; the benchmark starts from an empty folder")
        print(f"benchmark: resuming the run in {out} (finished: "
              f"{', '.join(s for s in SCRIPTS if f'{s}_s' in progress['timing']) or 'none'})", flush=True)
        progress["interrupted"] = progress["interrupted"] or bool(progress.pop("running", None))
        return progress
    if os.path.exists(os.path.join(out, "baseline.pth")):
        raise UserError(f"{out} already holds a run{' not started by benchmark.py' if own.RESUME else ''}; "
                        f"the benchmark starts from an empty folder")
    os.makedirs(out, exist_ok=True)
    progress = {"argv": run_flags, "environment": env,
                "reference": reference_workload(own.REFERENCE_SECONDS, device), "timing": {}, "interrupted": False}
    save_progress(out, progress)
    return progress


def save_progress(out, progress):
    write_json(os.path.join(out, PROGRESS_FILE), progress)


def run_scripts(out, routed, progress, stop_after):
    """Each script not finished yet, timed, its time stored in the progress file as soon as it ends. Returns
    False when the run stopped after `stop_after` before the last script."""
    for script, flags in routed.items():
        if f"{script}_s" in progress["timing"]:
            continue
        t0 = time.time()
        save_progress(out, {**progress, "running": script})
        proc = subprocess.run([sys.executable, os.path.join(HERE, script), f"--OUT_DIR={out}"] + flags)
        if proc.returncode:
            raise UserError(f"{script} failed with exit status {proc.returncode}")
        progress["timing"][f"{script}_s"] = round(time.time() - t0, 1)
        save_progress(out, progress)
        print(f"benchmark: {script} took {progress['timing'][f'{script}_s']:.0f}s", flush=True)
        if script == stop_after and script != SCRIPTS[-1]:
            print(f"benchmark: stopped after {script} (STOP_AFTER); go on with --RESUME=true", flush=True)
            return False
    return True


def main(argv):
    routed, own = route_flags(argv)
    out = own.OUT_DIR
    if own.STOP_AFTER and own.STOP_AFTER not in SCRIPTS:
        raise UserError(f"--STOP_AFTER must be one of {', '.join(SCRIPTS)}, got {own.STOP_AFTER!r}")
    if own.PUBLISH and os.path.exists(os.path.join(out, "benchmark.json")):
        publish(out, own.PUBLISH)
        return
    progress = start_or_resume(out, argv, own, run_device(routed["train_baseline.py"]))
    if not run_scripts(out, routed, progress, own.STOP_AFTER):
        return
    report(out, argv, progress)
    if own.PUBLISH:
        publish(out, own.PUBLISH)


def at_reference_speed(seconds, reference):
    """`seconds` of this run scaled to a machine whose reference workload runs at REFERENCE_SPEED images/s (a
    machine twice as fast takes half the time); unscaled when the run did not measure its reference."""
    return round(seconds * (reference["images_per_s"] / REFERENCE_SPEED if reference else 1.0), 1)


def report(out, argv, progress):
    """The finished run's timing, stage speeds, test rows and targets: printed, and written as benchmark.json."""
    reference, timing = progress["reference"], dict(progress["timing"])
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    # the scratch control runs inside compress_model.py but is no part of the pipeline: its time is reported apart
    seconds = results["search"]["seconds"]
    timing["scratch_control_s"] = round(seconds.get("scratch_control", 0.0), 1)
    timing["compress_model.py_s"] = round(timing["compress_model.py_s"] - timing["scratch_control_s"], 1)
    timing["total_s"] = round(sum(timing[f"{script}_s"] for script in SCRIPTS), 1)
    timing["total_s_at_reference"] = at_reference_speed(timing["total_s"], reference)
    rows = {r["stage"]: r for r in results["rows"]}
    profile = results["config"]["PROFILE"]
    checks = [{"target": t.description, "met": None if t.timed and progress["interrupted"]
               else bool(t.test(rows, timing, results["search"]))} for t in TARGETS[profile]]
    search_s = seconds["sensitivity_and_search"]
    timing["sensitivity_and_search_s"] = round(search_s, 1)
    speeds = stage_speeds(out)
    print(f"benchmark: total {timing['total_s'] / 60:.1f} min ({timing['total_s_at_reference'] / 60:.1f} min at a "
          f"reference workload of {REFERENCE_SPEED} images/s; the scratch control "
          f"{timing['scratch_control_s'] / 60:.1f} min more) on {results['machine']['cpu']} "
          f"({results['machine']['cores']} cores{', ' + results['machine']['gpu'] if 'gpu' in results['machine'] else ''}), "
          f"{profile} profile, of which sensitivity analysis and search {search_s / 60:.1f} min")
    for stage, s in speeds.items():
        print(f"  {stage:<12} {s['epochs']:>3} epochs {s['seconds']:8.1f}s {s['images_per_s']:8.0f} img/s  "
              f"val {s['val_accuracy']:.2f}%{'  peak GPU %.0f MiB' % s['peak_gpu_mib'] if 'peak_gpu_mib' in s else ''}")
    for stage, row in rows.items():
        print(f"  {stage:<12} test {row['accuracy']:.2f}%  {row['size_bytes'] / 2**20:8.3f} MiB  "
              f"b1 {row['latency_b1_ms']:.3f} ms  b64 {row['latency_b64_ms']:.2f} ms")
    for c in checks:
        print(f"  [{verdict(c)}] {c['target']}")
    write_json(os.path.join(out, "benchmark.json"),
        {"timing": timing, "interrupted": progress["interrupted"], "checks": checks, "profile": profile,
         "environment": progress.get("environment"), "reference_workload": reference,
         "stage_speeds": speeds, "command": " ".join([sys.argv[0]] + argv), "commit": git_commit(),
         "DATA_DIR": os.environ.get("DATA_DIR", ""), "host": platform.node(), "results": results}, indent=2)


def verdict(check):
    """How a target came out: met, MISSED, or not judged (a time target of a run that was interrupted)."""
    return "not judged: a script was interrupted" if check["met"] is None else "met" if check["met"] else "MISSED"


def git_commit():
    """The checkout's commit, with "+changes" when tracked files differ from it; None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


PUBLISHED = ("int8.onnx", "int8.sparse", "results.json", "search.json", "benchmark.json", "results.md",
             "pareto.png", "training.png", "sensitivity.png")  # the run's small files, about 1 MB


def publish(out, docs):
    """docs/results.md written from the finished run in `out` (benchmark.json, results.md, search.json), and the
    run's small files copied into docs/results/."""
    with open(os.path.join(out, "benchmark.json")) as f:
        bench = json.load(f)
    with open(os.path.join(out, "search.json")) as f:
        search = json.load(f)
    with open(os.path.join(out, "results.md")) as f:
        table = f.read().strip()
    files = os.path.join(docs, "results")
    os.makedirs(files, exist_ok=True)
    for name in PUBLISHED:
        if os.path.exists(os.path.join(out, name)):
            shutil.copyfile(os.path.join(out, name), os.path.join(files, name))
    atomic_write_text(os.path.join(docs, "results.md"), results_page(bench, search, table))
    print(f"benchmark: published {out} as {docs}/results.md and {files}/")


def results_page(bench, search, table):
    """The Markdown write-up of one finished benchmark run."""
    t, ref, machine = bench["timing"], bench["reference_workload"], bench["results"]["machine"]
    total = t["total_s"]
    share = lambda s: f"{t[s] / 60:.1f} min ({100 * t[s] / total:.0f}%)"
    lines = ["# The latest benchmark run", "",
             "Written by `benchmark.py --PUBLISH=docs` from the run's own files; the files themselves are in "
             "`docs/results/`. Do not edit by hand: publish the next run instead.", "",
             f"- Command: `{bench['command']}`" + (f" (DATA_DIR={bench['DATA_DIR']})" if bench.get("DATA_DIR") else ""),
             f"- Commit: {bench.get('commit') or 'not recorded (a benchmark.py that did not record it)'}",
             f"- Machine: {machine['cpu']}, {bench['results']['config'].get('DEVICE', '')}; torch "
             f"{machine.get('torch')}, onnxruntime {machine.get('onnxruntime')}",
             f"- Reference workload: " + (f"{ref['images_per_s']:.0f} images/s ({ref['device']}; stock resnet18 "
                                          f"training steps, batch 256, 32x32)" if ref else "not measured"),
             f"- Time: the three scripts {total / 60:.1f} min: train_baseline.py {share('train_baseline.py_s')}, "
             f"compress_model.py {share('compress_model.py_s')} (of which sensitivity analysis and search "
             f"{t['sensitivity_and_search_s'] / 60:.1f} min), evaluate_results.py {share('evaluate_results.py_s')}"
             + (f"; {t['total_s_at_reference'] / 60:.1f} min scaled to a reference workload of {REFERENCE_SPEED} "
                "images/s" if "total_s_at_reference" in t else "") + "; "
             f"the scratch control {t['scratch_control_s'] / 60:.1f} min more, apart", "",
             "## Targets", ""] + [f"- {'**missed**' if c['met'] is False else verdict(c)}: {c['target']}"
                                for c in bench["checks"]] + [
             "", "## Test split", "", table, "",
             "## Training stages", "", "| stage | epochs | seconds | images/s | last val acc |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {name} | {s['epochs']} | {s['seconds']:.0f} | {s['images_per_s']:.0f} | {s['val_accuracy']:.2f}% |"
              for name, s in bench["stage_speeds"].items()]
    lines += ["", f"## Every candidate of the search (validation, {search['objective']} objective, "
                  f"MAX_ACC_DROP={search['max_acc_drop']})", "",
              "| candidate | stage widths | float val | INT8 val | drop bound | within | MiB | M MACs | b1 ms "
              "| b64 ms |",
              "|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
    for c in search["candidates"] + ([search["scratch"]] if search.get("scratch") else []):
        name = c["name"] + (" (chosen)" if c["name"] == search["chosen"] else
                            " (control, not a candidate)" if c.get("kind") == "control" else "")
        widths = "-".join(str(w) for w in c["widths"]) if c.get("widths") else "-"  # runs before stream pruning: -
        lines.append(f"| {name} | {widths} | {c['float_val_acc']:.2f}% | {c['val_acc']:.2f}% | {c['drop_bound']:.2f} | "
                     f"{'yes' if c['within_budget'] else 'no'} | {c['bytes'] / 2**20:.3f} | {c['macs'] / 1e6:.1f} | "
                     f"{c['b1_ms']:.3f} | {c['b64_ms']:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_cli(main)
