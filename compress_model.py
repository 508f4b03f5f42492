"""Step 2 of 3: compress the baseline automatically, within an accuracy budget.

    python compress_model.py [--NAME=VALUE ...]

State how much validation accuracy you can give up (MAX_ACC_DROP, points) and what to optimise (OBJECTIVE);
the pipeline then
  1. distils the baseline into a narrower ResNet student                           -> OUT_DIR/student.pth
  2. measures each layer's sensitivity to pruning and to INT8                      -> OUT_DIR/sensitivity.*
  3. searches: structured channel pruning in steps (per-block ratios from the sensitivities), then gradual
     (AGP) unstructured pruning on the best of those, fine-tuning with distillation after every step; each
     candidate is quantized to INT8 (ONNX Runtime, with a mixed-precision fallback), stored, timed and
     judged on validation                                                          -> OUT_DIR/search.json
  4. keeps the best candidate within the budget, fine-tuned a little longer: float -> OUT_DIR/pruned.pth
     its INT8 ONNX file (what you deploy; runs without this code)                 -> OUT_DIR/int8.onnx
     the same INT8 model, sparsity stored compactly (utils/sparse.py)             -> OUT_DIR/int8.sparse
and, for comparison, the original README's recipe (quantize_dynamic on that model) -> OUT_DIR/seed_recipe.pth
Rerunning resumes an interrupted stage and reuses finished ones.
"""
import copy
import hashlib
import json
import os
import shutil
import time

import torch

from utils.checkpoint import (ARTIFACTS, atomic_write_text, clean_state_dict, load_checkpoint, load_model,
                              weights_fingerprint)
from utils.compress import count_params, export_onnx, onnx_param_counts, save_onnx_metadata, seed_recipe
from utils.config import check_choice, check_range, print_config, resolve_config, run_cli, script_constants
from utils.data import load_dataset, split_train_val
from utils.measure import b1_b64_latency, eager_predict
from utils.models import STEMS, ResNet, build_model
from utils.prune import (agp_schedule, allocate, blocks, magnitude_masks, prunable_layers,
                         structured_prune, weight_sparsity, zero_fractions)
from utils.search import OBJECTIVES, choose, measure_candidate, reference
from utils.plots import plot_sensitivity
from utils.sensitivity import sensitivity_analysis, sensitivity_table
from utils.sparse import save_sparse_onnx
from utils.train import distillation_objective, fit, model_accuracy, pick_device, sgd_one_cycle, write_checkpoint

# -----------------------------------------------------------------------------------------------
DATA_DIR = "data"            # the data the baseline was trained on (CIFAR-10 or ImageFolder root); env DATA_DIR too
DOWNLOAD = True              # download CIFAR-10 into DATA_DIR when no data is there (needs internet)
OUT_DIR = "runs"             # where baseline.pth is, and where every stage's artifact goes
MAX_ACC_DROP = 0.5           # points of validation accuracy the final INT8 model may lose against the baseline
OBJECTIVE = "balanced"       # size | latency | balanced: what the search minimises within MAX_ACC_DROP
PROFILE = "auto"             # auto | cpu | gpu: defaults below for the CPU, replaced by _PROFILES["gpu"] on CUDA
DEVICE = "auto"              # auto | cpu | cuda
STUDENT_STEM = "stride2"     # imagenet | cifar | stride2: the student's stem (stride2 = 3x3 stride-2 conv, no max-pool)
STUDENT_WIDTH = 32           # student channels in the first stage, doubled at each later stage (the baseline: 64)
KD_EPOCHS = 20               # distillation epochs
KD_TEMPERATURE = 4.0         # T: softening of both models' logits
KD_ALPHA = 0.9               # weight of the T^2-scaled KL term; 1 - KD_ALPHA weighs cross-entropy on the labels
KD_LR = 0.2                  # peak one-cycle learning rate of distillation
BATCH_SIZE = 256             # images per step (distillation and fine-tuning)
MOMENTUM = 0.9               # SGD Nesterov momentum
WEIGHT_DECAY = 5e-4          # L2 penalty
SENS_IMAGES = 2000           # validation images of the sensitivity analysis (the search judges on all of them)
STRUCT_MAX = 0.6             # largest fraction of the blocks' inner weights structured pruning removes, 0 to <1
STRUCT_STEPS = 3             # structured candidates, evenly spaced up to STRUCT_MAX, each pruned from the last
STRUCT_EPOCHS = 2            # fine-tuning epochs after each structured step
CHANNEL_MULTIPLE = 16        # inner widths are rounded to a multiple of this: INT8 kernels run slowly on odd widths
SPARSITY = 0.85              # unstructured sparsity of conv+linear weights at the last AGP step, 0 to <1
AGP_STEPS = 4                # AGP steps (cubic schedule) to SPARSITY, each a candidate (skipped for OBJECTIVE=latency)
AGP_EPOCHS = 1               # fine-tuning epochs after each AGP step
FINAL_EPOCHS = 3             # more fine-tuning of the chosen pruned model (zeros kept); kept if validation agrees
FINETUNE_LR = 0.02           # peak one-cycle learning rate of every fine-tuning
CALIB_IMAGES = 512           # training images that calibrate the INT8 activation ranges
CALIB_METHOD = "MinMax"      # MinMax | Entropy | Percentile (ONNX Runtime calibrators)
PER_CHANNEL = True           # per-output-channel weight scales (False: one scale per tensor)
MAX_FLOAT_LAYERS = 4         # INT8 fallback: most layers kept in float (most INT8-sensitive first) to meet the budget
LATENCY_THREADS = 1          # ONNX Runtime threads when timing candidates (as evaluate_results.py's THREADS)
LATENCY_RUNS = 100           # timed batch-1 runs per candidate (batch 64: a tenth)
CHANNELS_LAST = True         # channels-last memory format while training
SEED = 0                     # seed of initialisation, batch order and the calibration images
# -----------------------------------------------------------------------------------------------
_PROFILES = {"cpu": {}, "gpu": {"STUDENT_STEM": "cifar", "KD_EPOCHS": 40, "BATCH_SIZE": 512, "KD_LR": 0.4,
                               "STRUCT_EPOCHS": 4, "AGP_EPOCHS": 2}}


def check_config(cfg):
    check_choice(cfg, "STUDENT_STEM", STEMS)
    check_choice(cfg, "CALIB_METHOD", ("MinMax", "Entropy", "Percentile"))
    check_choice(cfg, "OBJECTIVE", OBJECTIVES)
    check_range(cfg, "MAX_ACC_DROP", 0, 100)
    for name in ("STUDENT_WIDTH", "BATCH_SIZE", "CALIB_IMAGES", "SENS_IMAGES", "LATENCY_THREADS", "LATENCY_RUNS",
                 "CHANNEL_MULTIPLE"):
        check_range(cfg, name, 1, 10**9)
    for name in ("KD_EPOCHS", "STRUCT_STEPS", "STRUCT_EPOCHS", "AGP_STEPS", "AGP_EPOCHS", "FINAL_EPOCHS",
                 "MAX_FLOAT_LAYERS"):
        check_range(cfg, name, 0, 10**9)
    for name in ("STRUCT_MAX", "SPARSITY"):
        check_range(cfg, name, 0, 1, high_open=True)
    check_range(cfg, "KD_TEMPERATURE", 0, 100, low_open=True)
    check_range(cfg, "KD_ALPHA", 0, 1)
    for name in ("KD_LR", "FINETUNE_LR"):
        check_range(cfg, name, 0, 10, low_open=True)
    check_range(cfg, "MOMENTUM", 0, 1, high_open=True)
    check_range(cfg, "WEIGHT_DECAY", 0, 1)


def train_stage(stage, path, model, objective, lr, epochs, train, val, cfg, inputs, meta_extra):
    """Distillation and fine-tuning share this: one-cycle SGD through the one training loop, checkpoints at `path`.
    inputs: what the stage starts from (fingerprints, amounts); a checkpoint made from other inputs is not resumed."""
    steps = len(train[0]) // cfg["BATCH_SIZE"]
    opt, sched = sgd_one_cycle(model, lr, cfg["MOMENTUM"], cfg["WEIGHT_DECAY"], epochs, max(steps, 1))
    resume_key = {"lr": lr, "epochs": epochs, **{k: cfg[k] for k in ("BATCH_SIZE", "MOMENTUM", "WEIGHT_DECAY",
                  "KD_TEMPERATURE", "KD_ALPHA", "SEED")}, **inputs}
    meta = {"stage": stage, "model": model.spec, "config": cfg, "resume_key": resume_key, **meta_extra}
    fit(model, objective, opt, sched, train, val, epochs=epochs, batch_size=cfg["BATCH_SIZE"], device=cfg["DEVICE"],
        seed=cfg["SEED"], ckpt_path=path, meta=meta, channels_last=cfg["CHANNELS_LAST"])


def summary(counts, path, val_acc):
    """What a before-to-after line shows of one model: counts = (parameters, nonzero), its file, its accuracy."""
    params, nonzero = counts
    return {"params": params, "nonzero": nonzero, "mib": os.path.getsize(path) / 2**20, "val_acc": val_acc}


def print_change(stage, before, after):
    fmt = "{params:>10,} params {nonzero:>10,} nonzero {mib:7.3f} MiB  val {val_acc:6.2f}%"
    print(f"{stage:<8} {fmt.format(**before)}  ->  {fmt.format(**after)}", flush=True)


def deployable(model):
    """A plain CPU copy of `model` in eval mode, rebuilt from its spec, pruning masks folded into the weights."""
    copy_ = build_model(model.spec)
    copy_.load_state_dict({k: v.cpu() for k, v in clean_state_dict(model).items()})
    return copy_.eval()


def sensitivities(student, student_id, val, calib, cfg):
    """The sensitivity analysis of the student (a deployable() copy) on SENS_IMAGES validation images, reused
    when sensitivity.json was made from the same student and images; also written as sensitivity.md and .png."""
    out = cfg["OUT_DIR"]
    path = os.path.join(out, "sensitivity.json")
    key = {"student": student_id, "SENS_IMAGES": cfg["SENS_IMAGES"], "CALIB_IMAGES": cfg["CALIB_IMAGES"]}
    if os.path.exists(path):
        with open(path) as f:
            earlier = json.load(f)
        if earlier.get("key") == key:
            print(f"sensitivity: reusing {path}")
            return earlier
    subset = tuple(t[:cfg["SENS_IMAGES"]].cpu() for t in val)
    float_onnx = export_onnx(student, os.path.join(out, "search", "student_fp32.onnx"))
    sens = {"key": key, **sensitivity_analysis(student, float_onnx, calib, subset, os.path.join(out, "search"),
                                               cfg["PER_CHANNEL"], cfg["CALIB_METHOD"])}
    atomic_write_text(os.path.join(out, "sensitivity.md"), sensitivity_table(sens))
    plot_sensitivity(sens, os.path.join(out, "sensitivity.png"))
    atomic_write_text(path, json.dumps(sens, indent=1) + "\n")
    return json.load(open(path))


def structured_counts(student, curves, level, multiple):
    """Inner widths per block when the `level` fraction of all inner weights goes, spread by sensitivity,
    rounded to a multiple of `multiple` (never below it, never above the block's width)."""
    sizes = {name: b.conv1.weight.numel() + b.conv2.weight.numel() for name, b in blocks(student).items()}
    ratios = allocate(curves, sizes, level)
    counts = {}
    for name, b in blocks(student).items():
        width = b.conv1.out_channels
        counts[name] = min(width, max(multiple, multiple * round(width * (1 - ratios[name]) / multiple)))
    return counts


def candidate_path(work, name, inputs):
    """A candidate's checkpoint, named by what it was made from: a rerun with other constants starts afresh
    instead of clashing with an older candidate of the same name."""
    digest = hashlib.sha1(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:8]
    return os.path.join(work, f"{name}_{digest}.pth")


def add_candidate(candidates, models, name, model, val, ctx, **info):
    """Measure `model` as a candidate (float accuracy, then its INT8 artifacts) and log it."""
    final = deployable(model)
    float_val = model_accuracy(final, *val, batch_size=500, device="cpu")
    entry = measure_candidate(name, final, float_val, ctx, params=count_params(final)[0],
                              sparsity=weight_sparsity(final), mids=final.spec["kwargs"].get("mids"), **info)
    candidates.append(entry)
    models[name] = final
    return entry


def search_step(run, name, model, parent, epochs, inputs, **info):
    """Fine-tune `model`, pruned from `parent`, with distillation (its checkpoint in the search folder), then
    measure it as a candidate. run: what every step shares (cfg, kd, train, val, extra, ctx, candidates, models)."""
    cfg = run["cfg"]
    model = model.to(cfg["DEVICE"])
    if cfg["CHANNELS_LAST"]:
        model = model.to(memory_format=torch.channels_last)
    inputs = {"source": weights_fingerprint(clean_state_dict(parent)), **inputs}
    train_stage("pruned", candidate_path(run["ctx"]["work_dir"], name, inputs), model, run["kd"], cfg["FINETUNE_LR"],
                epochs, run["train"], run["val"], cfg, inputs, run["extra"])
    return model, add_candidate(run["candidates"], run["models"], name, model, run["val"], run["ctx"], **info)


def seed_recipe_point(model, teacher, path, val, x, cfg):
    """The original README's recipe as a point of the Pareto plots: validation accuracy, bytes, and speed-ups
    over the baseline in eager PyTorch (the only runtime it has), timed with LATENCY_THREADS threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg["LATENCY_THREADS"])
    base = b1_b64_latency(eager_predict(teacher.cpu().eval()), x, cfg["LATENCY_RUNS"])
    seed = b1_b64_latency(eager_predict(model), x, cfg["LATENCY_RUNS"])
    torch.set_num_threads(threads)
    return {"name": "seed_recipe", "runtime": "pytorch (eager)", "val_acc": model_accuracy(model, *val, 500, "cpu"),
            "bytes": os.path.getsize(path), **seed, "speedup_b1": base["b1_ms"] / seed["b1_ms"],
            "speedup_b64": base["b64_ms"] / seed["b64_ms"]}


def main(argv):
    # 1. Constants, the baseline (teacher), the data split it was trained with, and the accuracy budget
    cfg = resolve_config(script_constants(globals()), argv, _PROFILES, pick_device)
    check_config(cfg)
    print_config(f"compress_model ({cfg['PROFILE']} profile)", cfg)
    torch.manual_seed(cfg["SEED"])
    device, out = cfg["DEVICE"], cfg["OUT_DIR"]
    base_path = os.path.join(out, ARTIFACTS["baseline"])
    base_ckpt = load_checkpoint(base_path, "baseline")
    teacher = load_model(base_ckpt, base_path).to(device)
    data = load_dataset(cfg["DATA_DIR"], cfg["DOWNLOAD"], out)
    base_cfg = base_ckpt["config"]
    train, val = split_train_val(*data["train"][:2], base_cfg["VAL_SIZE"], base_cfg["SEED"])
    if base_cfg.get("TRAIN_SUBSET"):
        train = (train[0][:base_cfg["TRAIN_SUBSET"]], train[1][:base_cfg["TRAIN_SUBSET"]])
    train = tuple(t.to(device) for t in train)
    t_start = time.time()
    base_val = model_accuracy(teacher, *val, batch_size=512, device=device)
    floor = base_val - cfg["MAX_ACC_DROP"]
    print(f"budget: baseline val {base_val:.2f}% - MAX_ACC_DROP {cfg['MAX_ACC_DROP']} = {floor:.2f}%, the least "
          f"validation accuracy the final INT8 model may have; OBJECTIVE={cfg['OBJECTIVE']}", flush=True)
    extra = {"teacher": base_path, "classes": base_ckpt["classes"]}

    # 2. Knowledge distillation into a narrower student (loss: KD_ALPHA*T^2*KL + (1-KD_ALPHA)*CE)
    w = cfg["STUDENT_WIDTH"]
    student = ResNet(stem=cfg["STUDENT_STEM"], widths=(w, 2 * w, 4 * w, 8 * w),
                     num_classes=base_ckpt["model"]["kwargs"]["num_classes"]).to(device)
    if cfg["CHANNELS_LAST"]:
        student = student.to(memory_format=torch.channels_last)
    kd = distillation_objective(teacher, cfg["KD_TEMPERATURE"], cfg["KD_ALPHA"])
    student_path = os.path.join(out, ARTIFACTS["student"])
    train_stage("student", student_path, student, kd, cfg["KD_LR"], cfg["KD_EPOCHS"], train, val, cfg,
                {"teacher": weights_fingerprint(base_ckpt["state_dict"])}, extra)
    student_cpu = deployable(student)
    student_id = weights_fingerprint(clean_state_dict(student_cpu))
    print_change("distill", summary(count_params(teacher), base_path, base_val),
                 summary(count_params(student_cpu), student_path, model_accuracy(student_cpu, *val, 500, "cpu")))
    t_search = time.time()

    # 3. Sensitivity of each layer to structured pruning, unstructured pruning and INT8 (validation images)
    pick = torch.randperm(len(train[0]), generator=torch.Generator().manual_seed(cfg["SEED"]))[:cfg["CALIB_IMAGES"]]
    calib = train[0][pick.to(train[0].device)].cpu().float() / 255
    sens = sensitivities(student_cpu, student_id, val, calib, cfg)
    print(f"sensitivity: {out}/sensitivity.md, sensitivity.png ({time.time() - t_search:.0f}s)", flush=True)

    # 4. The search. Every candidate: fine-tuned with distillation, quantized (INT8, float fallback for the most
    #    sensitive layers if needed), stored compactly, timed, and judged on the whole validation split.
    work = os.path.join(out, "search")
    x_latency = val[0][:64].float() / 255
    ctx = {"val": val, "calib": calib, "floor": floor, "int8_drops": sens["int8"], "max_float": cfg["MAX_FLOAT_LAYERS"],
           "per_channel": cfg["PER_CHANNEL"], "calib_method": cfg["CALIB_METHOD"], "work_dir": work,
           "x_latency": x_latency, "threads": cfg["LATENCY_THREADS"], "runs_b1": cfg["LATENCY_RUNS"],
           "latency_cache": {},
           "reference": reference(teacher, base_path, base_val, work, x_latency, cfg["LATENCY_THREADS"],
                                  cfg["LATENCY_RUNS"])}
    candidates, models = [], {}
    run = {"cfg": cfg, "kd": kd, "train": train, "val": val, "extra": extra, "ctx": ctx, "candidates": candidates,
           "models": models}
    add_candidate(candidates, models, "student", student, val, ctx, kind="student")
    current = student
    # 4a. Structured: remove inner channels of the blocks, step by step, each step from the last one kept
    for step in range(1, cfg["STRUCT_STEPS"] + 1):
        level = cfg["STRUCT_MAX"] * step / cfg["STRUCT_STEPS"]
        counts = structured_counts(student_cpu, sens["structured"], level, cfg["CHANNEL_MULTIPLE"])
        model, entry = search_step(run, f"struct{step}", structured_prune(deployable(current), counts), current,
                                   cfg["STRUCT_EPOCHS"], {"mids": counts}, kind="structured", level=level)
        if not entry["within_budget"]:
            break
        current = model
    # 4b. Unstructured, gradual (AGP): per-layer ratios from the sensitivities, on the last structured model kept
    agp = agp_schedule(cfg["SPARSITY"], cfg["AGP_STEPS"]) if cfg["OBJECTIVE"] != "latency" else []
    for step, target in enumerate(agp, 1):
        model = deployable(current)  # earlier zeros are folded in; the new masks keep them (ratios only grow)
        sizes = {n: m.weight.numel() for n, m in prunable_layers(model).items()}
        ratios = allocate(sens["unstructured"], sizes, target)
        magnitude_masks(model, ratios)
        model, entry = search_step(run, f"sparse{step}", model, current, cfg["AGP_EPOCHS"], {"ratios": ratios},
                                   kind="unstructured", target=target)
        if not entry["within_budget"]:
            break
        current = model
    chosen, met = choose(candidates, cfg["OBJECTIVE"])
    # 4c. Recovery: the chosen pruned model fine-tuned FINAL_EPOCHS more with its zeros kept; it replaces the
    #     chosen one if it stays within the budget and is at least as accurate on validation
    if chosen["name"] != "student" and met and cfg["FINAL_EPOCHS"]:
        parent = models[chosen["name"]]
        model = copy.deepcopy(parent)
        magnitude_masks(model, zero_fractions(model))  # masks exactly where the zeros are
        _, entry = search_step(run, f"{chosen['name']}_ft", model, parent, cfg["FINAL_EPOCHS"], {}, kind="recovery")
        if entry["within_budget"] and entry["val_acc"] >= chosen["val_acc"]:
            chosen = entry
    search_s = time.time() - t_search
    print(f"search: {len(candidates)} candidates in {search_s:.0f}s; chosen {chosen['name']} "
          f"({'within' if met else 'NOT within'} the budget, OBJECTIVE={cfg['OBJECTIVE']})", flush=True)
    if not met:
        print(f"warning: no candidate kept {floor:.2f}% on validation; {chosen['name']} is the most accurate. "
              f"Raise MAX_ACC_DROP or KD_EPOCHS.")

    # 5. The chosen model: float checkpoint (rebuilds its pruned shape), INT8 ONNX file, compact archive
    final = models[chosen["name"]]
    pruned_path = os.path.join(out, ARTIFACTS["pruned"])
    write_checkpoint(pruned_path, {"stage": "pruned", "model": final.spec, "config": cfg, "search": chosen, **extra},
                     final, None, None, 1, 1, [{"epoch": 1, "val_accuracy": chosen["float_val_acc"]}])
    int8_path = os.path.join(out, ARTIFACTS["int8"])
    shutil.copyfile(chosen["int8_onnx"], int8_path)
    save_onnx_metadata(int8_path, {"stage": "int8", "classes": base_ckpt["classes"], "config": cfg,
                                   "input": "float32 (N, 3, 32, 32) RGB in [0, 1]", "source": pruned_path,
                                   "float_layers": chosen["float_layers"]})
    sparse_path = os.path.join(out, ARTIFACTS["int8_sparse"])
    save_sparse_onnx(int8_path, sparse_path)
    student_stats = summary(count_params(student_cpu), student_path, candidates[0]["float_val_acc"])
    final_stats = summary(count_params(final), pruned_path, chosen["float_val_acc"])
    int8_stats = summary(onnx_param_counts(int8_path), int8_path, chosen["val_acc"])
    print_change("prune", student_stats, final_stats)
    print_change("int8", final_stats, int8_stats)
    print_change("store", int8_stats, {**int8_stats, "mib": os.path.getsize(sparse_path) / 2**20})

    # 6. The original README's recipe, for comparison: quantize_dynamic on the chosen model, saved as a state_dict
    seed_path = os.path.join(out, ARTIFACTS["seed_recipe"])
    seed_model = seed_recipe(final, seed_path, {"model": final.spec, "config": cfg, "classes": base_ckpt["classes"]})
    seed = seed_recipe_point(seed_model, teacher, seed_path, val, x_latency, cfg)
    print_change("seed", final_stats, {**final_stats, "mib": seed["bytes"] / 2**20, "val_acc": seed["val_acc"]})
    atomic_write_text(os.path.join(out, "search.json"), json.dumps(
        {"config": cfg, "baseline_val_acc": base_val, "floor": floor, "objective": cfg["OBJECTIVE"],
         "reference": ctx["reference"], "candidates": candidates, "chosen": chosen["name"], "budget_met": met,
         "seed_recipe": seed, "seconds": {"distillation": t_search - t_start, "sensitivity_and_search": search_s,
                                          "total": time.time() - t_start}}, indent=1) + "\n")
    print(f"compress_model: done in {time.time() - t_start:.0f}s (sensitivity and search {search_s:.0f}s); "
          f"next: python evaluate_results.py")


if __name__ == "__main__":
    run_cli(main)
