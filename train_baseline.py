"""Step 1 of 3: train the baseline ResNet-18 on CIFAR-10 and save it as OUT_DIR/baseline.pth.

    python train_baseline.py [--NAME=VALUE ...]      # any constant below, e.g. --EPOCHS=30

Rerunning after an interruption resumes from the last finished epoch.
"""
import os
import time

import torch

from utils.checkpoint import ARTIFACTS, versions
from utils.config import UserError, check_choice, check_range, print_config, resolve_config, run_cli, script_constants
from utils.data import load_dataset, split_train_val
from utils.models import ARCHS, ResNet, model_spec
from utils.train import cross_entropy_objective, fit, model_accuracy, pick_device, sgd_one_cycle

# -----------------------------------------------------------------------------------------------
DATA_DIR = "data"            # CIFAR-10 (torchvision layout) or an ImageFolder root with train/ and test/; env DATA_DIR too
DOWNLOAD = True              # download CIFAR-10 into DATA_DIR when no data is there (needs internet)
OUT_DIR = "runs"             # checkpoints, artifacts, results and the decoded-image cache
PROFILE = "auto"             # auto | cpu | gpu: defaults below for the CPU, replaced by _PROFILES["gpu"] on CUDA
DEVICE = "auto"              # auto | cpu | cuda
ARCH = "resnet18_stock"      # resnet18_stock (torchvision's layers, ImageNet stem) | resnet18_cifar (3x3 stride-1 stem)
EPOCHS = 20                  # passes over the training split
BATCH_SIZE = 256             # images per step
LR = 0.2                     # peak learning rate of the one-cycle schedule
MOMENTUM = 0.9               # SGD Nesterov momentum
WEIGHT_DECAY = 5e-4          # L2 penalty
LABEL_SMOOTHING = 0.1        # cross-entropy label smoothing, 0 to 1
VAL_SIZE = 5000              # training images held out for validation (all choices; the test split only reports)
TRAIN_SUBSET = 0             # train on the first N images of the training split only (0 = all); for quick tries
CHANNELS_LAST = True         # channels-last memory format (faster convolutions on CPU and GPU)
SEED = 0                     # seed of the validation split, initialisation and batch order
# -----------------------------------------------------------------------------------------------
_PROFILES = {"cpu": {}, "gpu": {"ARCH": "resnet18_cifar", "EPOCHS": 40, "BATCH_SIZE": 512, "LR": 0.4}}


def check_config(cfg):
    check_choice(cfg, "ARCH", tuple(ARCHS))
    for name in ("EPOCHS", "BATCH_SIZE", "VAL_SIZE"):
        check_range(cfg, name, 1, 10**9)
    check_range(cfg, "TRAIN_SUBSET", 0, 10**9)
    check_range(cfg, "LR", 0, 10, low_open=True)
    check_range(cfg, "LABEL_SMOOTHING", 0, 1, high_open=True)
    check_range(cfg, "MOMENTUM", 0, 1, high_open=True)
    check_range(cfg, "WEIGHT_DECAY", 0, 1)


def main(argv):
    # 1. Constants: defaults < device profile < flags; printed, and stored in the checkpoint
    cfg = resolve_config(script_constants(globals()), argv, _PROFILES, pick_device)
    check_config(cfg)
    print_config(f"train_baseline ({cfg['PROFILE']} profile)", cfg)
    torch.manual_seed(cfg["SEED"])
    device = cfg["DEVICE"]

    # 2. Data: decoded once into uint8 tensors; a validation split held out of train
    data = load_dataset(cfg["DATA_DIR"], cfg["DOWNLOAD"], cfg["OUT_DIR"])
    train, val = split_train_val(*data["train"][:2], cfg["VAL_SIZE"], cfg["SEED"])
    if cfg["TRAIN_SUBSET"]:
        train = (train[0][:cfg["TRAIN_SUBSET"]], train[1][:cfg["TRAIN_SUBSET"]])
    train, val = [tuple(t.to(device) for t in split) for split in (train, val)]
    classes = data["train"][2]
    print(f"data: {len(train[0])} train, {len(val[0])} validation, {len(data['test'][0])} test images, "
          f"{len(classes)} classes")

    # 3. Model and recipe: SGD + Nesterov, one-cycle learning rate, label smoothing, weight decay
    spec = model_spec(**ARCHS[cfg["ARCH"]], num_classes=len(classes))
    model = ResNet(**spec["kwargs"]).to(device)
    if cfg["CHANNELS_LAST"]:
        model = model.to(memory_format=torch.channels_last)
    steps = len(train[0]) // cfg["BATCH_SIZE"]
    if steps == 0:
        raise UserError(f"BATCH_SIZE={cfg['BATCH_SIZE']} is larger than the {len(train[0])} training images")
    opt, sched = sgd_one_cycle(model, cfg["LR"], cfg["MOMENTUM"], cfg["WEIGHT_DECAY"], cfg["EPOCHS"], steps)
    print(f"model: {cfg['ARCH']}, {sum(p.numel() for p in model.parameters()):,} parameters, on {device}")

    # 4. Train (resumes an unfinished OUT_DIR/baseline.pth), checkpointing every epoch
    resume_key = {k: cfg[k] for k in ("ARCH", "EPOCHS", "BATCH_SIZE", "LR", "MOMENTUM", "WEIGHT_DECAY",
                                      "LABEL_SMOOTHING", "VAL_SIZE", "TRAIN_SUBSET", "SEED")}
    meta = {"stage": "baseline", "model": spec, "classes": classes, "config": cfg, "resume_key": resume_key}
    path = os.path.join(cfg["OUT_DIR"], ARTIFACTS["baseline"])
    t0 = time.time()
    history = fit(model, cross_entropy_objective(cfg["LABEL_SMOOTHING"]), opt, sched, train, val,
                  epochs=cfg["EPOCHS"], batch_size=cfg["BATCH_SIZE"], device=device, seed=cfg["SEED"],
                  ckpt_path=path, meta=meta, channels_last=cfg["CHANNELS_LAST"])

    # 5. Summary: validation accuracy of the final weights (the test split is evaluate_results.py's)
    val_acc = model_accuracy(model, *val, batch_size=512, device=device)
    print(f"baseline: val_acc {val_acc:.2f}% after {len(history)} epochs ({time.time() - t0:.0f}s this run), "
          f"saved {path} ({os.path.getsize(path) / 2**20:.1f} MiB); torch {versions()['torch']}")
    print("next: python compress_model.py")


if __name__ == "__main__":
    run_cli(main)
