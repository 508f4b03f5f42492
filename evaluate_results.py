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
from dataclasses import asdict, dataclass, fields

import onnx
import torch

from utils.checkpoint import ARTIFACTS, CONTROL, MADE_BY, load_checkpoint, load_model, count_params, versions
from utils.config import UserError, check_choice, check_range, config_type, configure, run_cli
from utils.data import DATA_MODES, load_dataset
from utils.device import pick_device
from utils.dist import launched_layout
from utils.files import atomic_write_text, file_digest, out_dir_lock, write_json
from utils.measure import (Timing, accuracy_interval, eager_latency, gzip_size, machine_info, model_correct,
                           ort_correct, ort_latency, paired_drop_interval, percent, results_table)
from utils.plots import plot_pareto, plot_training
from utils.quantize import export_onnx, load_dynamic_quant, onnx_metadata, onnx_param_counts
from utils.search import float_onnx_path
from utils.sparse import SparseFormatError, read_sparse
from utils.train import METRICS_FILE

# -----------------------------------------------------------------------------------------------
DATA_DIR = "data"            # the data the baseline was trained on (CIFAR-10 or ImageFolder root); env DATA_DIR too
DOWNLOAD = True              # download CIFAR-10 into DATA_DIR when no data is there (needs internet)
DATA_MODE = "auto"           # auto | ram | stream: the test images decoded into memory or from the files batch by
                             # batch (ImageFolder data; auto: ram when they fit the memory); the size is the baseline's
OUT_DIR = "runs"             # where the stages' artifacts are, and where results.json / results.md go
PROFILE = "auto"             # auto | cpu | gpu: as the other scripts (this one's constants are the same in both)
DEVICE = "auto"              # auto | cpu | cuda: where float models' accuracy is measured (timing is always CPU)
THREADS = 1                  # CPU threads for timing, both runtimes (0 = all cores); accuracy uses every core
RUNS_B1 = 200                # timed runs at batch 1 (at least 100)
RUNS_B64 = 30                # timed runs at batch 64
WARMUP = 20                  # untimed runs before timing
EVAL_BATCH = 500             # batch size of the accuracy pass
# -----------------------------------------------------------------------------------------------
Config = config_type("Config", __file__)  # the constants above as a frozen dataclass: cfg.NAME
FLOAT_STAGES = ("baseline", "scratch", "student", "pruned")
INT8_STAGES = ("student_int8", "int8", "int8_sparse")
RUN_FILES = ("student_int8", "pruned", "int8", "int8_sparse", "dynamic_quant", "search")  # written together by
                                                                                          # compress_model.py


def check_config(cfg):
    check_choice(cfg, "DATA_MODE", DATA_MODES)
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
    needed = {"candidates", "chosen", "floor", "objective", "reference", "dynamic_quant", "baseline_val_acc", "student"}
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
    out = cfg.OUT_DIR
    artifacts = {stage: read_artifact(stage, os.path.join(out, name)) for stage, name in ARTIFACTS.items()}
    search = read_search(out)
    check_one_run(artifacts, search, out)
    if search.get("scratch"):
        control = {"scratch": read_artifact("scratch", os.path.join(out, CONTROL["scratch"]))}
        artifacts = {"baseline": artifacts.pop("baseline"), **control, **artifacts}
    return artifacts, search


@dataclass(frozen=True)
class Measured:
    """What measuring one artifact on the test split gives, before it is compared with the others."""
    stage: str
    artifact: str
    runtime: str
    correct: torch.Tensor        # per test image (bool); not stored
    params: int                  # None for the dynamic-quantization model (its weights are packed)
    nonzero_params: int
    latency: dict                # {runtime: {"b1_ms", "b64_ms"}}: "onnxruntime" and/or "pytorch"
    onnx_accuracy: float = None  # float models: test accuracy (%) of their ONNX export
    onnx_artifact: str = None    # ... and where that export is


@dataclass(frozen=True)
class Row(Measured):
    """One row of results.json's "rows" and of results.md's table: a measured artifact against the baseline (the
    first row) on the same runtime, and against the scratch control when there is one."""
    accuracy: float = None               # test accuracy (%) and its Wilson 95% interval
    accuracy_ci95: tuple = None
    accuracy_drop: float = None          # the baseline's accuracy - this one's (points), with the paired 95% interval
    accuracy_drop_ci95: tuple = None
    size_bytes: int = None               # the artifact's bytes on disk, and gzipped
    gzip_bytes: int = None
    size_ratio: float = None             # the baseline's bytes / size_bytes
    latency_b1_ms: float = None          # on this row's runtime (ONNX Runtime where it runs there)
    latency_b64_ms: float = None
    speedup_b1: float = None             # the baseline's latency on the same runtime / this one's
    speedup_b64: float = None
    gain_over_scratch: float = None      # this one's accuracy - the control's (points), with the paired interval
    gain_over_scratch_ci95: tuple = None


def picked_student(search):
    """search.json's entry of the student the search walked from (student.pth)."""
    return next(c for c in search["candidates"] if c["kind"] == "student" and c["arch"] == search["student"])


def search_exports(search, out):
    """Where compress_model.py's search exported each float stage's model (utils.search.float_onnx_path): the
    baseline, the scratch control, the student it walked from and the chosen model."""
    names = {"baseline": "baseline", "scratch": "scratch", "student": picked_student(search)["name"],
             "pruned": search["chosen"]}
    return {stage: float_onnx_path(os.path.join(out, "search"), name) for stage, name in names.items()}


def measure_float(art, test, cfg, timing, exported):
    """A .pth float model: accuracy (on DEVICE) and latency in eager PyTorch, and again as its ONNX export in
    ONNX Runtime (the search's export `exported` where that was made from the same weights)."""
    onnx_path = export_onnx(art.model, os.path.join(cfg.OUT_DIR, "onnx", f"{art.stage}_fp32.onnx"), reuse=[exported])
    params, nonzero = count_params(art.model)
    x = test.x[:64].float() / 255
    return Measured(art.stage, art.path, "onnxruntime (fp32 export)",
                    model_correct(art.model.to(cfg.DEVICE), test, cfg.DEVICE, cfg.EVAL_BATCH), params, nonzero,
                    {"onnxruntime": ort_latency(onnx_path, x, timing), "pytorch": eager_latency(art.model, x, timing)},
                    onnx_accuracy=percent(ort_correct(onnx_path, test, cfg.EVAL_BATCH)), onnx_artifact=onnx_path)


def measure_int8(art, test, cfg, timing):
    """The INT8 model as ONNX Runtime runs it: from int8.onnx, or rebuilt in memory from the compact archive
    int8.sparse (so that archive's accuracy is that of the weights it restores)."""
    serialized = art.model.SerializeToString()
    params, nonzero = onnx_param_counts(art.model)
    runtime = "onnxruntime (int8, archive)" if art.stage == "int8_sparse" else "onnxruntime (int8)"
    return Measured(art.stage, art.path, runtime, ort_correct(serialized, test, cfg.EVAL_BATCH), params, nonzero,
                    {"onnxruntime": ort_latency(serialized, test.x[:64].float() / 255, timing)})


def measure_dynamic_quant(art, test, cfg, timing):
    return Measured("dynamic_quant", art.path, "pytorch (eager)", model_correct(art.model, test, "cpu", cfg.EVAL_BATCH),
                    None, None, {"pytorch": eager_latency(art.model, test.x[:64].float() / 255, timing)})


def measure_all(artifacts, search, test, cfg, timing):
    measured, exported = [], search_exports(search, cfg.OUT_DIR)
    for stage, art in artifacts.items():
        if stage in FLOAT_STAGES:
            measured.append(measure_float(art, test, cfg, timing, exported[stage]))
        else:
            measure = measure_int8 if stage in INT8_STAGES else measure_dynamic_quant
            measured.append(measure(art, test, cfg, timing))
        print(f"measured {stage}: test accuracy {percent(measured[-1].correct):.2f}%", flush=True)
    return compare(measured)


def compare(measured):
    """Rows: accuracy with its 95% interval, the drop against the baseline (the first) with its paired 95%
    interval (the same test images), bytes on disk, gzip bytes, and ratios against the baseline on the same
    runtime; with the scratch control among them, each one's gain over it, paired too."""
    base = measured[0]
    control = next((m for m in measured if m.stage == "scratch"), None)
    base_bytes = os.path.getsize(base.artifact)
    rows = []
    for m in measured:
        runtime = "onnxruntime" if "onnxruntime" in m.latency else "pytorch"
        size, latency, base_latency = os.path.getsize(m.artifact), m.latency[runtime], base.latency[runtime]
        gain = {} if control is None else {
            "gain_over_scratch": percent(m.correct) - percent(control.correct),
            "gain_over_scratch_ci95": paired_drop_interval(m.correct, control.correct)}
        rows.append(Row(**{f.name: getattr(m, f.name) for f in fields(Measured)}, accuracy=percent(m.correct),
                        accuracy_ci95=accuracy_interval(m.correct),
                        accuracy_drop=percent(base.correct) - percent(m.correct),
                        accuracy_drop_ci95=paired_drop_interval(base.correct, m.correct), size_bytes=size,
                        gzip_bytes=gzip_size(m.artifact), size_ratio=base_bytes / size,
                        latency_b1_ms=latency["b1_ms"], latency_b64_ms=latency["b64_ms"],
                        speedup_b1=base_latency["b1_ms"] / latency["b1_ms"],
                        speedup_b64=base_latency["b64_ms"] / latency["b64_ms"], **gain))
    return rows


def stored(row):
    """A Row as results.json holds it: every field but the per-image correctness."""
    return {k: v for k, v in asdict(row).items() if k != "correct"}


def control_summary(rows):
    """Lines saying what distillation bought: the distilled student and the shipped INT8 model against the scratch
    control, with paired 95% intervals; none without the control."""
    by_stage = {row.stage: row for row in rows}
    if "scratch" not in by_stage:
        return []
    return [f"{stage} against the scratch control (same architecture and epochs, no teacher): "
            f"{by_stage[stage].gain_over_scratch:+.2f} points on test (paired 95% "
            "{:+.2f} to {:+.2f})".format(*by_stage[stage].gain_over_scratch_ci95) for stage in ("student", "int8")]


def against_student(rows, search):
    """What pruning bought: the shipped INT8 model against the unpruned student's INT8 model (student_int8.onnx),
    both timed here in ONNX Runtime: speed-ups at batch 1 and 64, and the student's MACs over the shipped model's
    (search.json)."""
    by_stage = {row.stage: row for row in rows}
    student, shipped = by_stage["student_int8"], by_stage["int8"]
    first = picked_student(search)
    chosen = next(c for c in search["candidates"] if c["name"] == search["chosen"])
    return {"speedup_b1": student.latency_b1_ms / shipped.latency_b1_ms,
            "speedup_b64": student.latency_b64_ms / shipped.latency_b64_ms,
            "mac_ratio": first["macs"] / chosen["macs"]}


def choice_summary(search):
    """What the search (search.json) chose, and whether it met the budget."""
    within = "within" if search.get("budget_met") else "NOT within"
    return (f"chose {search['chosen']} of {len(search['candidates'])} candidates (OBJECTIVE={search['objective']}, "
            f"student {search.get('student')}, {within} MAX_ACC_DROP={search.get('max_acc_drop')} by the paired 95% "
            f"bound on validation)")


def draw(search, cfg):
    """pareto.png (the search's candidates against size and speed) and training.png (metrics.jsonl)."""
    out = cfg.OUT_DIR
    plot_pareto(search, os.path.join(out, "pareto.png"))
    drew = plot_training(os.path.join(out, METRICS_FILE), os.path.join(out, "training.png"))
    print(f"search: {choice_summary(search)}; Pareto fronts in "
          f"{out}/pareto.png{'; training curves in ' + out + '/training.png' if drew else ''}")


def write_results(rows, search, test, cfg, timing):
    pruning = against_student(rows, search)
    lines = control_summary(rows) + [
        "int8 against the student's INT8 (student_int8.onnx, same runtime): {speedup_b1:.2f}x faster at batch 1, "
        "{speedup_b64:.2f}x at batch 64, {mac_ratio:.2f}x fewer MACs".format(**pruning)]
    table = results_table([stored(row) for row in rows]) + "\n\n" + "\n".join(lines)
    print(table)
    machine = {**machine_info(), "threads": timing.threads, **versions()}
    header = (f"Machine: {machine['cpu']}, {timing.threads} threads; torch {machine['torch']}, "
              f"onnxruntime {machine['onnxruntime']}. Test split: {len(test.x)} images. Run {search['run_id']}.\n\n")
    keys = ("run_id", "chosen", "student", "objective", "max_acc_drop", "floor", "baseline_val_acc", "budget_met",
            "seconds")
    atomic_write_text(os.path.join(cfg.OUT_DIR, "results.md"), header + table + "\n")
    write_json(os.path.join(cfg.OUT_DIR, "results.json"),
        {"created": time.strftime("%Y-%m-%d %H:%M:%S"), "config": asdict(cfg), "machine": machine,
         "test_images": len(test.x), "search": {k: search.get(k) for k in keys}, "against_student": pruning,
         "rows": [stored(row) for row in rows]}, indent=2)


def main(argv):
    layout = launched_layout()
    if not layout.writer:  # started by torchrun as one of several ranks: rank 0 alone evaluates
        return
    cfg = configure(Config, "evaluate_results", argv, check_config, {}, pick_device)
    if layout.world > 1:  # torchrun gave this rank one thread; accuracy uses every core
        torch.set_num_threads(layout.cores)
    timing = Timing(cfg.THREADS or layout.cores, cfg.RUNS_B1, cfg.RUNS_B64, cfg.WARMUP)
    print(f"threads: {timing.threads} for timing (PyTorch and ONNX Runtime), every core for accuracy")
    with out_dir_lock(cfg.OUT_DIR, "evaluate_results.py"):
        artifacts, search = load_artifacts(cfg)
        test = load_dataset(cfg.DATA_DIR, cfg.DOWNLOAD, cfg.OUT_DIR, artifacts["baseline"].model.image_size,
                            cfg.DATA_MODE)["test"]
        t0 = time.time()
        rows = measure_all(artifacts, search, test, cfg, timing)
        draw(search, cfg)
        write_results(rows, search, test, cfg, timing)
        print(f"wrote {cfg.OUT_DIR}/results.json and results.md ({time.time() - t0:.0f}s of measuring)")


if __name__ == "__main__":
    run_cli(main)
