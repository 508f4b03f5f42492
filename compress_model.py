"""Step 2 of 3: compress the baseline in three stages, each saved so that it can be evaluated.

    python compress_model.py [--NAME=VALUE ...]

  1. knowledge distillation into a narrower ResNet student      -> OUT_DIR/student.pth
  2. global magnitude pruning + fine-tuning with the masks kept  -> OUT_DIR/pruned.pth
  3. static INT8 quantization (ONNX Runtime, QDQ, per-channel)   -> OUT_DIR/int8.onnx (runs without this code)
and, for comparison, the original README's recipe (quantize_dynamic on the pruned model) -> OUT_DIR/seed_recipe.pth
Rerunning resumes an interrupted stage and reuses finished ones.
"""
import copy
import os
import time

import torch

from utils.checkpoint import ARTIFACTS, load_checkpoint, load_model, weights_fingerprint
from utils.compress import (count_params, export_onnx, global_magnitude_prune, make_pruning_permanent,
                            onnx_param_counts, quantize_int8, save_onnx_metadata, seed_recipe, weight_sparsity)
from utils.config import check_choice, check_range, print_config, resolve_config, run_cli, script_constants
from utils.data import load_dataset, split_train_val
from utils.measure import ort_predict, ort_session
from utils.models import STEMS, ResNet
from utils.train import distillation_objective, fit, model_accuracy, pick_device, predict_accuracy, sgd_one_cycle

# -----------------------------------------------------------------------------------------------
DATA_DIR = "data"            # the data the baseline was trained on (CIFAR-10 or ImageFolder root); env DATA_DIR too
DOWNLOAD = True              # download CIFAR-10 into DATA_DIR when no data is there (needs internet)
OUT_DIR = "runs"             # where baseline.pth is, and where every stage's artifact goes
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
PRUNE_AMOUNT = 0.4           # fraction of all conv and linear weights set to zero, ranked globally by |w|, 0 to <1
FINETUNE_EPOCHS = 3          # fine-tuning epochs after pruning (distillation loss, masks kept)
FINETUNE_LR = 0.02           # peak one-cycle learning rate of fine-tuning
CALIB_IMAGES = 512           # training images that calibrate the INT8 activation ranges
CALIB_METHOD = "MinMax"      # MinMax | Entropy | Percentile (ONNX Runtime calibrators)
PER_CHANNEL = True           # per-output-channel weight scales (False: one scale per tensor)
CHANNELS_LAST = True         # channels-last memory format while training
SEED = 0                     # seed of initialisation, batch order and the calibration images
# -----------------------------------------------------------------------------------------------
_PROFILES = {"cpu": {}, "gpu": {"STUDENT_STEM": "cifar", "KD_EPOCHS": 40, "BATCH_SIZE": 512, "KD_LR": 0.4}}


def check_config(cfg):
    check_choice(cfg, "STUDENT_STEM", STEMS)
    check_choice(cfg, "CALIB_METHOD", ("MinMax", "Entropy", "Percentile"))
    for name in ("STUDENT_WIDTH", "BATCH_SIZE", "CALIB_IMAGES"):
        check_range(cfg, name, 1, 10**9)
    for name in ("KD_EPOCHS", "FINETUNE_EPOCHS"):
        check_range(cfg, name, 0, 10**9)
    check_range(cfg, "KD_TEMPERATURE", 0, 100, low_open=True)
    check_range(cfg, "KD_ALPHA", 0, 1)
    check_range(cfg, "PRUNE_AMOUNT", 0, 1, high_open=True)
    for name in ("KD_LR", "FINETUNE_LR"):
        check_range(cfg, name, 0, 10, low_open=True)
    check_range(cfg, "MOMENTUM", 0, 1, high_open=True)
    check_range(cfg, "WEIGHT_DECAY", 0, 1)


def summary(counts, path, val_acc):
    """What a before-to-after line shows of one model: counts = (parameters, nonzero), its file, its accuracy."""
    params, nonzero = counts
    return {"params": params, "nonzero": nonzero, "mib": os.path.getsize(path) / 2**20, "val_acc": val_acc}


def print_change(stage, before, after):
    fmt = "{params:>10,} params {nonzero:>10,} nonzero {mib:7.2f} MiB  val {val_acc:6.2f}%"
    print(f"{stage:<8} {fmt.format(**before)}  ->  {fmt.format(**after)}", flush=True)


def train_stage(stage, model, objective, lr, epochs, train, val, cfg, inputs, meta_extra):
    """Distillation and fine-tuning share this: one-cycle SGD through the one training loop.
    inputs: what the stage starts from (fingerprints, amounts); a checkpoint made from other inputs is not resumed."""
    steps = len(train[0]) // cfg["BATCH_SIZE"]
    opt, sched = sgd_one_cycle(model, lr, cfg["MOMENTUM"], cfg["WEIGHT_DECAY"], epochs, max(steps, 1))
    resume_key = {"lr": lr, "epochs": epochs, **{k: cfg[k] for k in ("BATCH_SIZE", "MOMENTUM", "WEIGHT_DECAY",
                  "KD_TEMPERATURE", "KD_ALPHA", "SEED")}, **inputs}
    meta = {"stage": stage, "model": model.spec, "config": cfg, "resume_key": resume_key, **meta_extra}
    path = os.path.join(cfg["OUT_DIR"], ARTIFACTS[stage])
    fit(model, objective, opt, sched, train, val, epochs=epochs, batch_size=cfg["BATCH_SIZE"], device=cfg["DEVICE"],
        seed=cfg["SEED"], ckpt_path=path, meta=meta, channels_last=cfg["CHANNELS_LAST"])
    return path


def main(argv):
    # 1. Constants, the baseline (teacher) and the data split it was trained with
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
    train, val = [tuple(t.to(device) for t in split) for split in (train, val)]
    t_start = time.time()
    teacher_stats = summary(count_params(teacher), base_path, model_accuracy(teacher, *val, batch_size=512, device=device))

    # 2. Knowledge distillation into a narrower student (loss: KD_ALPHA*T^2*KL + (1-KD_ALPHA)*CE)
    w = cfg["STUDENT_WIDTH"]
    student = ResNet(stem=cfg["STUDENT_STEM"], widths=(w, 2 * w, 4 * w, 8 * w),
                     num_classes=base_ckpt["model"]["kwargs"]["num_classes"]).to(device)
    if cfg["CHANNELS_LAST"]:
        student = student.to(memory_format=torch.channels_last)
    kd = distillation_objective(teacher, cfg["KD_TEMPERATURE"], cfg["KD_ALPHA"])
    teacher_id = weights_fingerprint(base_ckpt["state_dict"])
    path = train_stage("student", student, kd, cfg["KD_LR"], cfg["KD_EPOCHS"], train, val, cfg,
                       {"teacher": teacher_id}, {"teacher": base_path, "classes": base_ckpt["classes"]})
    student_stats = summary(count_params(student), path, model_accuracy(student, *val, batch_size=512, device=device))
    print_change("distill", teacher_stats, student_stats)

    # 3. Global magnitude pruning, fine-tuning with the masks kept, then the zeros made permanent
    pruned = copy.deepcopy(student).to(memory_format=torch.contiguous_format)  # prune ranks flat views
    global_magnitude_prune(pruned, cfg["PRUNE_AMOUNT"])
    if cfg["CHANNELS_LAST"]:
        pruned = pruned.to(memory_format=torch.channels_last)
    print(f"pruning: {weight_sparsity(pruned):.2%} of conv+linear weights zeroed; val "
          f"{model_accuracy(pruned, *val, batch_size=512, device=device):.2f}% before fine-tuning")
    student_id = weights_fingerprint(student.state_dict())
    path = train_stage("pruned", pruned, kd, cfg["FINETUNE_LR"], cfg["FINETUNE_EPOCHS"], train, val, cfg,
                       {"student": student_id, "PRUNE_AMOUNT": cfg["PRUNE_AMOUNT"]},
                       {"teacher": base_path, "classes": base_ckpt["classes"]})
    make_pruning_permanent(pruned)
    pruned = pruned.to("cpu", memory_format=torch.contiguous_format).eval()
    pruned_stats = summary(count_params(pruned), path, model_accuracy(pruned, *val, batch_size=512, device="cpu"))
    print_change("prune", student_stats, pruned_stats)
    print(f"pruning: {weight_sparsity(pruned):.2%} of conv+linear weights are zero after fine-tuning")

    # 4. Static INT8: export the pruned model to ONNX, calibrate on training images, quantize every conv
    float_onnx = export_onnx(pruned, os.path.join(out, "onnx", "pruned_fp32.onnx"))
    pick = torch.randperm(len(train[0]), generator=torch.Generator().manual_seed(cfg["SEED"]))[:cfg["CALIB_IMAGES"]]
    calib = train[0][pick.to(train[0].device)].cpu().float() / 255
    int8_path = os.path.join(out, ARTIFACTS["int8"])
    quantize_int8(float_onnx, int8_path, calib, cfg["PER_CHANNEL"], cfg["CALIB_METHOD"])
    save_onnx_metadata(int8_path, {"stage": "int8", "classes": base_ckpt["classes"], "config": cfg,
                                   "input": "float32 (N, 3, 32, 32) RGB in [0, 1]", "source": path})
    int8_val = predict_accuracy(ort_predict(ort_session(int8_path, os.cpu_count())), *val, batch_size=500,
                                device="cpu")
    print_change("int8", summary(onnx_param_counts(float_onnx), float_onnx, pruned_stats["val_acc"]),
                 summary(onnx_param_counts(int8_path), int8_path, int8_val))
    print(f"int8: {os.path.getsize(float_onnx) / os.path.getsize(int8_path):.2f}x smaller than the float ONNX export")

    # 5. The original README's recipe, for comparison: quantize_dynamic on the pruned model, saved as a state_dict
    seed_path = os.path.join(out, ARTIFACTS["seed_recipe"])
    seed_model = seed_recipe(pruned, seed_path, {"model": pruned.spec, "config": cfg, "classes": base_ckpt["classes"]})
    seed_val = model_accuracy(seed_model, *val, batch_size=512, device="cpu")
    print_change("seed", pruned_stats, {**pruned_stats, "mib": os.path.getsize(seed_path) / 2**20, "val_acc": seed_val})
    print(f"compress_model: done in {time.time() - t_start:.0f}s; next: python evaluate_results.py")


if __name__ == "__main__":
    run_cli(main)
