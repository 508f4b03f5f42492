"""Step 3 of 3: measure every stage's artifact as loaded back from disk and write the comparison table.

    python evaluate_results.py [--NAME=VALUE ...]

Writes OUT_DIR/results.json and OUT_DIR/results.md and prints the same table, with every row's gain over the
scratch control (the student's architecture trained without a teacher) when compress_model.py made one; draws
pareto.png (the search) and training.png (every training stage's curves, from metrics.jsonl). Accuracy is on
the whole test split, in float32, on every core (float models on the GPU where DEVICE is cuda); latency is the
median over timed runs after warm-up with THREADS threads; every float model is also exported to ONNX, so that
the baseline and the INT8 model are timed on the same runtime. Before any slow work, every artifact is read back
and checked: all readable, and the files of compress_model.py from one run (the same run id in each).
"""
import json
import os
import time
from dataclasses import dataclass

import onnx

from utils.checkpoint import ARTIFACTS, CONTROL, MADE_BY, load_checkpoint, load_model, count_params, versions
from utils.config import UserError, check_range, configure, run_cli
from utils.data import load_dataset
from utils.device import pick_device
from utils.files import atomic_write_text, file_digest, out_dir_lock, write_json
from utils.measure import (Timing, accuracy_interval, eager_latency, gzip_size, machine_info, model_correct,
                           ort_correct, ort_latency, paired_drop_interval, percent, results_table)
from utils.plots import plot_pareto, plot_training
from utils.quantize import export_onnx, load_dynamic_quant, onnx_metadata, onnx_param_counts
from utils.sparse import SparseFormatError, read_sparse
from utils.train import METRICS_FILE

# -----------------------------------------------------------------------------------------------
DATA_DIR = "data"            # the data the baseline was trained on (CIFAR-10 or ImageFolder root); env DATA_DIR too
DOWNLOAD = True              # download CIFAR-10 into DATA_DIR when no data is there (needs internet)
OUT_DIR = "runs"             # where the stages' artifacts are, and where results.json / results.md go
PROFILE = "auto"             # auto | cpu | gpu: as the other scripts (this one's constants are the same in both)
DEVICE = "auto"              # auto | cpu | cuda: where float models' accuracy is measured (timing is always CPU)
THREADS = 1                  # CPU threads for timing, both runtimes (0 = all cores); accuracy uses every core
RUNS_B1 = 200                # timed runs at batch 1 (at least 100)
RUNS_B64 = 30                # timed runs at batch 64
WARMUP = 20                  # untimed runs before timing
EVAL_BATCH = 500             # batch size of the accuracy pass
# -----------------------------------------------------------------------------------------------
FLOAT_STAGES = ("baseline", "scratch", "student", "pruned")
INT8_STAGES = ("int8", "int8_sparse")
RUN_FILES = ("pruned", "int8", "int8_sparse", "dynamic_quant", "search")  # written together by compress_model.py


def check_config(cfg):
    check_range(cfg, "THREADS", 0, 4096)
    check_range(cfg, "RUNS_B1", 100, 10**6)
    for name in ("RUNS_B64", "EVAL_BATCH"):
        check_range(cfg, name, 1, 10**6)
    check_range(cfg, "WARMUP", 0, 10**6)


@dataclass
class Artifact:
    """One stage's file as read back from disk: its model (eager module or ONNX ModelProto) and its run id."""
    stage: str
    path: str
    model: object
    run_id: str = None


def read_artifact(stage, path):
    """Read one stage's file; anything missing or unreadable is a one-line UserError naming it."""
    if not os.path.exists(path):
        raise UserError(f"no {stage} artifact at {path}: run {MADE_BY[stage]} first")
    if stage in FLOAT_STAGES:
        ckpt = load_checkpoint(path, stage, finished=True)
        return Artifact(stage, path, load_model(ckpt, path), ckpt.get("run_id"))
    if stage == "dynamic_quant":
        model, ckpt = load_dynamic_quant(path)
        return Artifact(stage, path, model, ckpt.get("run_id"))
    try:
        if stage == "int8_sparse":
            model, header = read_sparse(path)
            return Artifact(stage, path, model, header.get("run_id"))
        model = onnx.load(path)
        onnx.checker.check_model(model)
        return Artifact(stage, path, model, onnx_metadata(model, "run_id"))
    except SparseFormatError as e:
        raise UserError(str(e)) from None
    except Exception as e:  # protobuf DecodeError, checker errors, bad metadata
        raise UserError(f"{path} is not a readable ONNX model (corrupt or truncated?): {type(e).__name__}") from None


def read_search(out):
    path = os.path.join(out, "search.json")
    if not os.path.exists(path):
        raise UserError(f"no search.json in {out}: run compress_model.py first")
    try:
        with open(path) as f:
            search = json.load(f)
    except ValueError as e:
        raise UserError(f"{path} is unreadable (corrupt or truncated?): {type(e).__name__}; rerun compress_model.py")
    needed = {"candidates", "chosen", "floor", "objective", "reference", "dynamic_quant", "baseline_val_acc"}
    if not isinstance(search, dict) or not needed <= set(search):
        raise UserError(f"{path} lacks what evaluate_results.py reads (an older or foreign file?); rerun "
                        f"compress_model.py")
    return search


def check_one_run(artifacts, search, out):
    """The files of compress_model.py must come from one run (the same run id in each) and from the baseline and
    student now in OUT_DIR; otherwise name the odd one out."""
    ids = {stage: artifacts[stage].run_id for stage in RUN_FILES if stage != "search"}
    ids["search"] = search.get("run_id")
    expected = search.get("run_id")
    odd = [f"{ARTIFACTS.get(stage, 'search.json')} (run {run_id})" for stage, run_id in ids.items()
           if run_id != expected]
    if odd:
        raise UserError(f"artifacts of different runs in {out}: search.json is run {expected}, but "
                        f"{', '.join(odd)}; rerun compress_model.py")
    for name, digest in search.get("inputs", {}).items():
        if file_digest(os.path.join(out, name)) != digest:
            raise UserError(f"{os.path.join(out, name)} changed after compress_model.py made run {expected} from it;"
                            f" rerun compress_model.py")


def load_artifacts(cfg):
    """Every stage's artifact read back from disk and checked, before any slow work; the scratch control after
    the baseline when the search made one."""
    out = cfg["OUT_DIR"]
    artifacts = {stage: read_artifact(stage, os.path.join(out, name)) for stage, name in ARTIFACTS.items()}
    search = read_search(out)
    check_one_run(artifacts, search, out)
    if search.get("scratch"):
        control = {"scratch": read_artifact("scratch", os.path.join(out, CONTROL["scratch"]))}
        artifacts = {"baseline": artifacts.pop("baseline"), **control, **artifacts}
    return artifacts, search


def measure_float(art, test, cfg, timing):
    """A .pth float model: accuracy (on DEVICE) and latency in eager PyTorch, and again as its ONNX export in
    ONNX Runtime."""
    onnx_path = export_onnx(art.model, os.path.join(cfg["OUT_DIR"], "onnx", f"{art.stage}_fp32.onnx"))
    params, nonzero = count_params(art.model)
    x = test.x[:64].float() / 255
    return {"stage": art.stage, "artifact": art.path, "runtime": "onnxruntime (fp32 export)",
            "correct": model_correct(art.model.to(cfg["DEVICE"]), test, cfg["DEVICE"], cfg["EVAL_BATCH"]),
            "onnx_accuracy": percent(ort_correct(onnx_path, test, cfg["EVAL_BATCH"])),
            "params": params, "nonzero_params": nonzero, "onnx_artifact": onnx_path,
            "latency": {"onnxruntime": ort_latency(onnx_path, x, timing),
                        "pytorch": eager_latency(art.model, x, timing)}}


def measure_int8(art, test, cfg, timing):
    """The INT8 model as ONNX Runtime runs it: from int8.onnx, or rebuilt in memory from the compact archive
    int8.sparse (so that archive's accuracy is that of the weights it restores)."""
    serialized = art.model.SerializeToString()
    params, nonzero = onnx_param_counts(art.model)
    runtime = "onnxruntime (int8, archive)" if art.stage == "int8_sparse" else "onnxruntime (int8)"
    return {"stage": art.stage, "artifact": art.path, "runtime": runtime,
            "correct": ort_correct(serialized, test, cfg["EVAL_BATCH"]), "params": params,
            "nonzero_params": nonzero, "latency": {"onnxruntime": ort_latency(serialized, test.x[:64].float() / 255,
                                                                              timing)}}


def measure_dynamic_quant(art, test, cfg, timing):
    return {"stage": "dynamic_quant", "artifact": art.path, "runtime": "pytorch (eager)",
            "correct": model_correct(art.model, test, "cpu", cfg["EVAL_BATCH"]),
            "params": None, "nonzero_params": None,
            "latency": {"pytorch": eager_latency(art.model, test.x[:64].float() / 255, timing)}}


def measure_all(artifacts, test, cfg, timing):
    rows = []
    for stage, art in artifacts.items():
        measure = (measure_float if stage in FLOAT_STAGES else measure_int8 if stage in INT8_STAGES
                   else measure_dynamic_quant)
        rows.append(measure(art, test, cfg, timing))
        print(f"measured {stage}: test accuracy {percent(rows[-1]['correct']):.2f}%", flush=True)
    add_comparisons(rows)
    return rows


def add_comparisons(rows):
    """Accuracy with its 95% interval, the drop against the baseline with its paired 95% interval (the same
    test images), bytes on disk, gzip bytes, and ratios against the baseline on the same runtime."""
    correct = [row.pop("correct") for row in rows]  # per image; not stored
    base = rows[0]  # filled in first, so every later row can compare with it
    for row, hits in zip(rows, correct):
        row["accuracy"], row["accuracy_ci95"] = percent(hits), accuracy_interval(hits)
        row["accuracy_drop_ci95"] = paired_drop_interval(correct[0], hits)
        row["size_bytes"] = os.path.getsize(row["artifact"])
        row["gzip_bytes"] = gzip_size(row["artifact"])
        runtime = "onnxruntime" if "onnxruntime" in row["latency"] else "pytorch"
        row["latency_b1_ms"] = row["latency"][runtime]["b1_ms"]
        row["latency_b64_ms"] = row["latency"][runtime]["b64_ms"]
        row["size_ratio"] = base["size_bytes"] / row["size_bytes"]
        row["speedup_b1"] = base["latency"][runtime]["b1_ms"] / row["latency_b1_ms"]
        row["speedup_b64"] = base["latency"][runtime]["b64_ms"] / row["latency_b64_ms"]
        row["accuracy_drop"] = base["accuracy"] - row["accuracy"]
    stages = [row["stage"] for row in rows]
    if "scratch" in stages:  # what distillation bought: each row's gain over the control, paired on the same images
        control = correct[stages.index("scratch")]
        for row, hits in zip(rows, correct):
            row["gain_over_scratch"] = percent(hits) - percent(control)
            row["gain_over_scratch_ci95"] = paired_drop_interval(hits, control)


def control_summary(rows):
    """Lines saying what distillation bought: the distilled student and the shipped INT8 model against the scratch
    control, with paired 95% intervals; none without the control."""
    by_stage = {row["stage"]: row for row in rows}
    if "scratch" not in by_stage:
        return []
    return [f"{stage} against the scratch control (same architecture and epochs, no teacher): "
            f"{by_stage[stage]['gain_over_scratch']:+.2f} points on test (paired 95% "
            "{:+.2f} to {:+.2f})".format(*by_stage[stage]["gain_over_scratch_ci95"]) for stage in ("student", "int8")]


def choice_summary(search):
    """What the search (search.json) chose, and whether it met the budget."""
    within = "within" if search.get("budget_met") else "NOT within"
    return (f"chose {search['chosen']} of {len(search['candidates'])} candidates (OBJECTIVE={search['objective']}, "
            f"student {search.get('student')}, {within} MAX_ACC_DROP={search.get('max_acc_drop')} by the paired 95% "
            f"bound on validation)")


def draw(search, cfg):
    """pareto.png (the search's candidates against size and speed) and training.png (metrics.jsonl)."""
    out = cfg["OUT_DIR"]
    plot_pareto(search, os.path.join(out, "pareto.png"))
    drew = plot_training(os.path.join(out, METRICS_FILE), os.path.join(out, "training.png"))
    print(f"search: {choice_summary(search)}; Pareto fronts in "
          f"{out}/pareto.png{'; training curves in ' + out + '/training.png' if drew else ''}")


def write_results(rows, search, test, cfg, timing):
    lines = control_summary(rows)
    table = results_table(rows) + ("\n\n" + "\n".join(lines) if lines else "")
    print(table)
    machine = {**machine_info(), "threads": timing.threads, **versions()}
    header = (f"Machine: {machine['cpu']}, {timing.threads} threads; torch {machine['torch']}, "
              f"onnxruntime {machine['onnxruntime']}. Test split: {len(test.x)} images. Run {search['run_id']}.\n\n")
    keys = ("run_id", "chosen", "student", "objective", "max_acc_drop", "floor", "baseline_val_acc", "budget_met",
            "seconds")
    atomic_write_text(os.path.join(cfg["OUT_DIR"], "results.md"), header + table + "\n")
    write_json(os.path.join(cfg["OUT_DIR"], "results.json"),
        {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "config": cfg, "machine": machine,
         "test_images": len(test.x), "search": {k: search.get(k) for k in keys}, "rows": rows}, indent=2)


def main(argv):
    cfg = configure("evaluate_results", globals(), argv, check_config, {}, pick_device)
    timing = Timing(cfg["THREADS"] or os.cpu_count(), cfg["RUNS_B1"], cfg["RUNS_B64"], cfg["WARMUP"])
    print(f"threads: {timing.threads} for timing (PyTorch and ONNX Runtime), every core for accuracy")
    with out_dir_lock(cfg["OUT_DIR"], "evaluate_results.py"):
        artifacts, search = load_artifacts(cfg)
        test = load_dataset(cfg["DATA_DIR"], cfg["DOWNLOAD"], cfg["OUT_DIR"])["test"]
        t0 = time.time()
        rows = measure_all(artifacts, test, cfg, timing)
        draw(search, cfg)
        write_results(rows, search, test, cfg, timing)
        print(f"wrote {cfg['OUT_DIR']}/results.json and results.md ({time.time() - t0:.0f}s of measuring)")


if __name__ == "__main__":
    run_cli(main)
