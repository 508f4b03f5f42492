"""The search's bookkeeping: each candidate model turned into its deployable INT8 artifacts and measured
(validation accuracy, bytes, latency), the INT8 fallback to mixed precision, and the choice under the budget.

A candidate is judged by the artifact that ships: its INT8 ONNX file (latency, run by ONNX Runtime) and the
compact archive of that file (size). Accuracy is always the validation split's; the test split is not seen.
"""
import json
import math
import os

from .compress import export_onnx, quantize_int8
from .measure import b1_b64_latency, ort_predict, ort_session
from .sparse import save_sparse_onnx
from .train import predict_accuracy

OBJECTIVES = ("size", "latency", "balanced")


def ort_accuracy(path, val, threads=None):
    return predict_accuracy(ort_predict(ort_session(path, threads or os.cpu_count())), *val, batch_size=500)


def ort_latency(path, x, threads, runs_b1):
    return b1_b64_latency(ort_predict(ort_session(path, threads)), x, runs_b1)


def reference(teacher, baseline_path, val_acc, work_dir, x, threads, runs_b1):
    """What every candidate is compared with: the baseline checkpoint's bytes, its float ONNX export's latency."""
    onnx_path = export_onnx(teacher, os.path.join(work_dir, "baseline_fp32.onnx"))
    return {"name": "baseline", "val_acc": val_acc, "bytes": os.path.getsize(baseline_path),
            **ort_latency(onnx_path, x, threads, runs_b1)}


def quantize_within_budget(float_onnx, int8_path, ctx):
    """Post-training INT8; when it alone falls under the budget floor, keep the layers most sensitive to INT8
    in float, 1, 2, 4, ... of them up to ctx["max_float"]. Returns (val accuracy, layers kept in float)."""
    order = sorted(ctx["int8_drops"], key=lambda n: -ctx["int8_drops"][n])
    keep, count = [], 1
    while True:
        quantize_int8(float_onnx, int8_path, ctx["calib"], ctx["per_channel"], ctx["calib_method"], keep_float=keep)
        acc = ort_accuracy(int8_path, ctx["val"])
        if acc >= ctx["floor"] or count > ctx["max_float"]:
            return acc, keep
        keep, count = order[:count], count * 2


def shared_latency(name, int8_path, shape, ctx):
    """Latency of a candidate's INT8 graph. ONNX Runtime's dense kernels take the same time whatever the weight
    values, so candidates with the same shape (inner widths, layers kept in float) share one measurement, made
    on the first of them: timing noise then cannot decide between candidates that differ only in zeros.
    ctx["latency_cache"] holds {shape: (measured on, latency)}."""
    key = json.dumps(shape)
    if key not in ctx["latency_cache"]:
        ctx["latency_cache"][key] = (name, ort_latency(int8_path, ctx["x_latency"], ctx["threads"], ctx["runs_b1"]))
    source, latency = ctx["latency_cache"][key]
    return {**latency, "latency_measured_on": source}


def measure_candidate(name, model, float_val, ctx, **info):
    """Export, quantize (with the fallback), archive and time one candidate; returns its log entry."""
    float_onnx = export_onnx(model, os.path.join(ctx["work_dir"], f"{name}_fp32.onnx"))
    int8_path = os.path.join(ctx["work_dir"], f"{name}.int8.onnx")
    if float_val >= ctx["floor"]:
        val_acc, keep = quantize_within_budget(float_onnx, int8_path, ctx)
    else:  # already outside the budget in float: no fallback can help, measure plain INT8 for the log
        quantize_int8(float_onnx, int8_path, ctx["calib"], ctx["per_channel"], ctx["calib_method"])
        val_acc, keep = ort_accuracy(int8_path, ctx["val"]), []
    archive = int8_path.replace(".onnx", ".sparse")
    entry = {"name": name, "float_val_acc": float_val, "val_acc": val_acc, "float_layers": keep,
             "within_budget": val_acc >= ctx["floor"], "onnx_bytes": os.path.getsize(int8_path),
             "bytes": save_sparse_onnx(int8_path, archive), "int8_onnx": int8_path, "archive": archive,
             **shared_latency(name, int8_path, [model.spec, keep], ctx), **info}
    ref = ctx["reference"]
    entry.update(size_ratio=ref["bytes"] / entry["bytes"], speedup_b1=ref["b1_ms"] / entry["b1_ms"],
                 speedup_b64=ref["b64_ms"] / entry["b64_ms"])
    print(f"candidate {name:<10} val {float_val:6.2f}% float -> {val_acc:6.2f}% int8"
          f"{' (float: ' + ', '.join(keep) + ')' if keep else ''}  {entry['bytes'] / 2**20:6.3f} MiB "
          f"({entry['size_ratio']:5.1f}x)  b1 {entry['b1_ms']:.3f} ms ({entry['speedup_b1']:.2f}x)  "
          f"b64 {entry['b64_ms']:.2f} ms ({entry['speedup_b64']:.2f}x)"
          f"{'' if entry['latency_measured_on'] == name else ' (timed as ' + entry['latency_measured_on'] + ')'}  "
          f"{'within' if entry['within_budget'] else 'OUTSIDE'} budget", flush=True)
    return entry


def score(entry, objective):
    """Lower is better. size: bytes on disk; latency: geometric mean of the batch-1 and batch-64 times;
    balanced: geometric mean of the size ratio and the two speed-ups (all against the baseline)."""
    latency = math.sqrt(entry["b1_ms"] * entry["b64_ms"])
    if objective == "size":
        return (entry["bytes"], latency)
    if objective == "latency":
        return (latency, entry["bytes"])
    return (-(entry["size_ratio"] * entry["speedup_b1"] * entry["speedup_b64"]) ** (1 / 3),)


def choose(candidates, objective):
    """The best candidate by `objective` among those within the budget: (entry, True). With none within the
    budget, the most accurate: (entry, False)."""
    within = [c for c in candidates if c["within_budget"]]
    if not within:
        return max(candidates, key=lambda c: c["val_acc"]), False
    return min(within, key=lambda c: score(c, objective)), True
