"""Step 3 of 3: measure every stage's artifact as loaded back from disk and write the comparison table.

    python evaluate_results.py [--NAME=VALUE ...]

Writes OUT_DIR/results.json and OUT_DIR/results.md and prints the same table. Accuracy is on the whole test
split; latency is the median over timed runs after warm-up, with a fixed thread count; every float model is
also exported to ONNX, so that the baseline and the INT8 model are timed on the same runtime.
"""
import json
import os
import time

import onnx
import torch

from utils.checkpoint import ARTIFACTS, MADE_BY, atomic_write_text, load_checkpoint, load_model, versions
from utils.compress import count_params, export_onnx, load_seed_recipe, onnx_param_counts
from utils.config import UserError, check_range, print_config, resolve_config, run_cli, script_constants
from utils.data import load_dataset
from utils.plots import plot_pareto
from utils.sparse import load_sparse_onnx
from utils.measure import (eager_predict, gzip_size, machine_info, median_latency_ms, ort_predict, ort_session,
                           results_table)
from utils.train import predict_accuracy

# -----------------------------------------------------------------------------------------------
DATA_DIR = "data"            # the data the baseline was trained on (CIFAR-10 or ImageFolder root); env DATA_DIR too
DOWNLOAD = True              # download CIFAR-10 into DATA_DIR when no data is there (needs internet)
OUT_DIR = "runs"             # where the stages' artifacts are, and where results.json / results.md go
THREADS = 1                  # CPU threads for inference and timing, both runtimes (0 = all cores); see README
RUNS_B1 = 200                # timed runs at batch 1 (at least 100)
RUNS_B64 = 30                # timed runs at batch 64
WARMUP = 20                  # untimed runs before timing
EVAL_BATCH = 500             # batch size of the accuracy pass
# -----------------------------------------------------------------------------------------------
FLOAT_STAGES = ("baseline", "student", "pruned")


def check_config(cfg):
    check_range(cfg, "THREADS", 0, 4096)
    check_range(cfg, "RUNS_B1", 100, 10**6)
    for name in ("RUNS_B64", "EVAL_BATCH"):
        check_range(cfg, name, 1, 10**6)
    check_range(cfg, "WARMUP", 0, 10**6)


def latencies(predict, test_x, cfg):
    """Median ms at batch 1 and batch 64 on real test images."""
    x1, x64 = test_x[:1].float() / 255, test_x[:64].float() / 255
    return {"b1_ms": median_latency_ms(predict, x1, cfg["WARMUP"], cfg["RUNS_B1"]),
            "b64_ms": median_latency_ms(predict, x64, max(cfg["WARMUP"] // 10, 1), cfg["RUNS_B64"])}


def measure_float(stage, test, cfg, threads):
    """A .pth float model: accuracy and latency in eager PyTorch, and again as its ONNX export in ONNX Runtime."""
    path = os.path.join(cfg["OUT_DIR"], ARTIFACTS[stage])
    model = load_model(load_checkpoint(path, stage), path)
    params, nonzero = count_params(model)
    eager = eager_predict(model)
    onnx_path = export_onnx(model, os.path.join(cfg["OUT_DIR"], "onnx", f"{stage}_fp32.onnx"))
    session = ort_predict(ort_session(onnx_path, threads))
    return {"stage": stage, "artifact": path, "runtime": "onnxruntime (fp32 export)",
            "accuracy": predict_accuracy(eager, *test, cfg["EVAL_BATCH"]),
            "onnx_accuracy": predict_accuracy(session, *test, cfg["EVAL_BATCH"]),
            "params": params, "nonzero_params": nonzero, "onnx_artifact": onnx_path,
            "latency": {"onnxruntime": latencies(session, test[0], cfg), "pytorch": latencies(eager, test[0], cfg)}}


def measure_int8(stage, test, cfg, threads):
    """The INT8 model as ONNX Runtime runs it: from int8.onnx, or rebuilt in memory from the compact archive
    int8.sparse (so that archive's accuracy is that of the weights it restores)."""
    path = os.path.join(cfg["OUT_DIR"], ARTIFACTS[stage])
    if stage == "int8_sparse":
        try:
            model = load_sparse_onnx(path)
        except ValueError as e:
            raise UserError(str(e)) from None
    else:
        model = onnx.load(path)
    session = ort_predict(ort_session(model.SerializeToString(), threads))
    params, nonzero = onnx_param_counts(model)
    runtime = "onnxruntime (int8, archive)" if stage == "int8_sparse" else "onnxruntime (int8)"
    return {"stage": stage, "artifact": path, "runtime": runtime,
            "accuracy": predict_accuracy(session, *test, cfg["EVAL_BATCH"]), "params": params,
            "nonzero_params": nonzero, "latency": {"onnxruntime": latencies(session, test[0], cfg)}}


def measure_seed_recipe(test, cfg):
    path = os.path.join(cfg["OUT_DIR"], ARTIFACTS["seed_recipe"])
    model = load_seed_recipe(path)
    eager = eager_predict(model)
    return {"stage": "seed_recipe", "artifact": path, "runtime": "pytorch (eager)",
            "accuracy": predict_accuracy(eager, *test, cfg["EVAL_BATCH"]),
            "params": None, "nonzero_params": None, "latency": {"pytorch": latencies(eager, test[0], cfg)}}


def add_sizes_and_ratios(rows):
    """Bytes on disk, gzip bytes, and ratios against the baseline on the same runtime."""
    base = rows[0]
    for row in rows:
        row["size_bytes"] = os.path.getsize(row["artifact"])
        row["gzip_bytes"] = gzip_size(row["artifact"])
        runtime = "onnxruntime" if "onnxruntime" in row["latency"] else "pytorch"
        row["latency_b1_ms"] = row["latency"][runtime]["b1_ms"]
        row["latency_b64_ms"] = row["latency"][runtime]["b64_ms"]
        row["size_ratio"] = base["size_bytes"] / row["size_bytes"]
        row["speedup_b1"] = base["latency"][runtime]["b1_ms"] / row["latency_b1_ms"]
        row["speedup_b64"] = base["latency"][runtime]["b64_ms"] / row["latency_b64_ms"]
        row["accuracy_drop"] = base["accuracy"] - row["accuracy"]


def main(argv):
    # 1. Constants; a fixed thread count for both runtimes
    cfg = resolve_config(script_constants(globals()), argv)
    check_config(cfg)
    threads = cfg["THREADS"] or os.cpu_count()
    torch.set_num_threads(threads)
    print_config("evaluate_results", cfg)
    print(f"threads: {threads} (PyTorch and ONNX Runtime)")

    # 2. Every artifact present (before any slow work), and the test split (used here only, for reporting)
    for stage, path in ARTIFACTS.items():
        if not os.path.exists(os.path.join(cfg["OUT_DIR"], path)):
            raise UserError(f"no {stage} artifact at {os.path.join(cfg['OUT_DIR'], path)}: run {MADE_BY[stage]} first")
    if not os.path.exists(os.path.join(cfg["OUT_DIR"], "search.json")):
        raise UserError(f"no search.json in {cfg['OUT_DIR']}: run compress_model.py first")
    data = load_dataset(cfg["DATA_DIR"], cfg["DOWNLOAD"], cfg["OUT_DIR"])
    test = data["test"][:2]

    # 3. Each stage's artifact loaded back from disk, measured
    t0 = time.time()
    rows = []
    for stage in FLOAT_STAGES:
        rows.append(measure_float(stage, test, cfg, threads))
        print(f"measured {stage}: test accuracy {rows[-1]['accuracy']:.2f}%", flush=True)
    for stage in ("int8", "int8_sparse"):
        rows.append(measure_int8(stage, test, cfg, threads))
        print(f"measured {stage}: test accuracy {rows[-1]['accuracy']:.2f}%", flush=True)
    rows.append(measure_seed_recipe(test, cfg))
    print(f"measured seed_recipe: test accuracy {rows[-1]['accuracy']:.2f}%", flush=True)
    add_sizes_and_ratios(rows)

    # 4. The search's candidates (validation accuracy) against size and speed: Pareto fronts in pareto.png
    search = json.load(open(os.path.join(cfg["OUT_DIR"], "search.json")))
    plot_pareto(search, os.path.join(cfg["OUT_DIR"], "pareto.png"))
    keys = ("chosen", "objective", "floor", "baseline_val_acc", "budget_met", "seconds")
    search_summary = {k: search[k] for k in keys}
    print(f"search: chose {search['chosen']} of {len(search['candidates'])} candidates "
          f"(OBJECTIVE={search['objective']}, validation floor {search['floor']:.2f}%); "
          f"Pareto fronts in {cfg['OUT_DIR']}/pareto.png")

    # 5. The table on the terminal, results.md and results.json
    table = results_table(rows)
    print(table)
    machine = {**machine_info(), "threads": threads, **versions()}
    header = (f"Machine: {machine['cpu']}, {threads} threads; torch {machine['torch']}, "
              f"onnxruntime {machine['onnxruntime']}. Test split: {len(test[0])} images.\n\n")
    atomic_write_text(os.path.join(cfg["OUT_DIR"], "results.md"), header + table + "\n")
    atomic_write_text(os.path.join(cfg["OUT_DIR"], "results.json"), json.dumps(
        {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "config": cfg, "machine": machine,
         "test_images": len(test[0]), "search": search_summary, "rows": rows}, indent=2) + "\n")
    print(f"wrote {cfg['OUT_DIR']}/results.json and results.md ({time.time() - t0:.0f}s of measuring)")


if __name__ == "__main__":
    run_cli(main)
