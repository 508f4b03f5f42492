"""Step 1 of 3: train the baseline ResNet-18 on CIFAR-10 and save it as OUT_DIR/baseline.pth.

    python train_baseline.py [--NAME=VALUE ...]      # any constant below, e.g. --EPOCHS=30

Rerunning after an interruption resumes from the last finished epoch.
"""
import os
import time
from dataclasses import asdict, replace

import torch

from utils.checkpoint import ARTIFACTS, versions
from utils.config import UserError, check_choice, check_range, config_type, configure, run_cli
from utils.data import DATA_MODES, DataSource, check_batch, open_splits
from utils.device import check_amp_dtype, pick_device
from utils.dist import data_parallel, follow, ranks_working, share_data
from utils.files import out_dir_lock
from utils.measure import model_accuracy
from utils.models import ARCHS, LARGE_IMAGES, ResNet, whiten_stem, zero_init_residual
from utils.train import Stage, cross_entropy_objective, fit, placed_for_training, recipe_from

# -----------------------------------------------------------------------------------------------
DATA_DIR = "data"            # CIFAR-10 (torchvision layout) or an ImageFolder root with train/ and test/; env DATA_DIR too
DOWNLOAD = True              # download CIFAR-10 into DATA_DIR when no data is there (needs internet)
OUT_DIR = "runs"             # checkpoints, artifacts, results and the decoded-image cache
PROFILE = "auto"             # auto | cpu | gpu: defaults below for the CPU, replaced by PROFILES["gpu"] on CUDA
DEVICE = "auto"              # auto | cpu | cuda
ARCH = "auto"                # auto | resnet18_s2 (3x3 stride-2 stem: 16x16 maps at 32 px) | resnet18_pool (3x3
                             # stride-1 conv + 2x2 max-pool: 16x16 maps) | resnet18_cifar (stride 1: 32x32 maps, 4x
                             # the MACs) | resnet18_stock (torchvision's ImageNet stem: 8x8 maps); auto: resnet18_s2
                             # in the CPU profile, resnet18_cifar in the GPU one, resnet18_stock from IMAGE_SIZE 96 up
IMAGE_SIZE = 32              # px: the square images every stage trains, evaluates, calibrates, exports and times at
                             # (images of another size are resized and centre-cropped, their aspect kept)
DATA_MODE = "auto"           # auto | ram | stream: decoded images kept in memory, or decoded from the files batch by
                             # batch in DataLoader workers (ImageFolder data); auto: ram when they fit the memory
EPOCHS = 20                  # passes over the training split
BATCH_SIZE = 256             # images per step
LR = 0.2                     # peak learning rate of the one-cycle schedule
MOMENTUM = 0.9               # SGD Nesterov momentum
WEIGHT_DECAY = 5e-4          # L2 penalty of conv and linear weights (none on BN and biases)
LABEL_SMOOTHING = 0.2        # cross-entropy label smoothing, 0 to 1
LOOKAHEAD = 0                # 0: off; K: Lookahead every K steps towards slow weights (utils.train.Lookahead)
BN_MOMENTUM = 0.1            # 0 to 1: weight of each batch in BatchNorm's running statistics while training (torch's
                             # momentum); airbench trains at 0.4 (0.6 in its convention): Lookahead pays only with it
BN_BIAS_LR = 16.0            # BatchNorm biases' peak learning rate as a multiple of the stage's, 1 to leave them at
                             # it; airbench's 64 with frozen scales: 18 -> 13.5 epochs to 94% (docs/experiments.md)
FREEZE_BN_WEIGHTS = True     # BatchNorm scales not trained (airbench has none); the baseline's blocks then start as
                             # initialised, not as the identity (a frozen zero scale would switch a block off)
ALTERNATE_FLIP = False       # mirror each training image in every other epoch (a fixed random half in the first), not
                             # at random (airbench: 10.8 -> 9.9 epochs to 94%)
WHITEN_STEM = False          # stem conv set to the whitening of its input patches and frozen (airbench's init)
WHITEN_IMAGES = 5000         # training images whose patches the whitening is computed on
VAL_SIZE = 5000              # training images held out for validation (all choices; the test split only reports)
TRAIN_SUBSET = 0             # train on the first N images of the training split only (0 = all); for quick tries
CHANNELS_LAST = True         # channels-last memory format (faster convolutions on CPU and GPU)
AMP_DTYPE = "auto"           # auto | float32 | bfloat16: autocast dtype of each training step (auto: bfloat16 where
                             # the CPU has bf16 matrix instructions or on a GPU; validation stays float32)
RANKS = "auto"               # auto | N: data-parallel processes; auto: one per GPU on CUDA, on the CPU as many as use
                             # the most cores with 32+ images each a step, the cores shared out as threads; env RANKS
                             # too
RANK_TIMEOUT = 300           # seconds a rank may stop answering (or a training collective wait) before the run ends
SEED = 0                     # seed of the validation split, initialisation and batch order
# -----------------------------------------------------------------------------------------------
PROFILES = {"cpu": {}, "gpu": {"EPOCHS": 40, "BATCH_SIZE": 512, "LR": 0.4, "AMP_DTYPE": "bfloat16"}}
Config = config_type("Config", __file__)  # the constants above as a frozen dataclass: cfg.NAME


def check_config(cfg):
    check_choice(cfg, "ARCH", ("auto",) + tuple(ARCHS))
    check_choice(cfg, "DATA_MODE", DATA_MODES)
    check_range(cfg, "IMAGE_SIZE", 8, 4096)
    check_amp_dtype(cfg)
    for name in ("EPOCHS", "BATCH_SIZE", "VAL_SIZE"):
        check_range(cfg, name, 1, 10**9)
    for name in ("TRAIN_SUBSET", "LOOKAHEAD"):
        check_range(cfg, name, 0, 10**9)
    check_range(cfg, "WHITEN_IMAGES", 1, 10**9)
    check_range(cfg, "RANK_TIMEOUT", 1, 10**6)
    check_range(cfg, "LR", 0, 10, low_open=True)
    check_range(cfg, "LABEL_SMOOTHING", 0, 1, high_open=True)
    check_range(cfg, "MOMENTUM", 0, 1, high_open=True)
    check_range(cfg, "BN_MOMENTUM", 0, 1)
    check_range(cfg, "BN_BIAS_LR", 0, 10**4)
    check_range(cfg, "WEIGHT_DECAY", 0, 1)


def arch_for(cfg):
    """ARCH, with auto resolved: from LARGE_IMAGES px up torchvision's ImageNet stem (it divides the maps by 4 as
    ImageNet-sized models do: the usual choice for photos), below it the stride-2 stem in the CPU profile (4x
    fewer MACs than stride 1, docs/experiments.md) and the stride-1 CIFAR stem in the GPU profile (the most
    accurate)."""
    if cfg.ARCH != "auto":
        return cfg.ARCH
    if cfg.IMAGE_SIZE >= LARGE_IMAGES:
        return "resnet18_stock"
    return "resnet18_cifar" if cfg.PROFILE == "gpu" else "resnet18_s2"


def load_splits(cfg, layout):
    """Images decoded once into a uint8 cache (or files streamed, DATA_MODE); a validation split held out of
    train; both on the CPU. The other ranks open the same (share_data)."""
    source = DataSource(cfg.DATA_DIR, cfg.DOWNLOAD, cfg.OUT_DIR, cfg.IMAGE_SIZE, cfg.DATA_MODE, cfg.VAL_SIZE,
                        cfg.SEED, cfg.TRAIN_SUBSET)
    data, train, val, source = open_splits(source, layout.threads)
    print(f"data: {len(train.x)} train, {len(val.x)} validation, {len(data['test'].x)} test images, "
          f"{len(train.classes)} classes")
    check_batch(cfg.BATCH_SIZE, train)
    share_data(source)
    return train, val


def build(cfg, train):
    """The model and its recipe: SGD + Nesterov, one-cycle learning rate, label smoothing, weight decay on the
    weights only, each residual block starting as the identity (utils.models.zero_init_residual), with
    WHITEN_STEM the stem whitening the first WHITEN_IMAGES training images' patches (utils.models.whiten_stem)."""
    model = ResNet(**ARCHS[cfg.ARCH], num_classes=len(train.classes), image_size=cfg.IMAGE_SIZE)
    if not cfg.FREEZE_BN_WEIGHTS:  # a frozen zero scale would keep a block switched off
        model = zero_init_residual(model)
    if cfg.WHITEN_STEM:
        whiten_stem(model, train.x[:cfg.WHITEN_IMAGES].cpu())
    model = placed_for_training(model, cfg.DEVICE, cfg.CHANNELS_LAST)
    print(f"model: {cfg.ARCH}, {sum(p.numel() for p in model.parameters()):,} parameters, on {cfg.DEVICE}")
    return model, recipe_from(cfg, cfg.LR, cfg.EPOCHS)


def main(argv):
    # Constants: defaults < device profile < environment < flags; printed, and stored in the checkpoint
    cfg = configure(Config, "train_baseline", argv, check_config, PROFILES, pick_device, show=False)
    cfg = replace(cfg, ARCH=arch_for(cfg))  # stored resolved: a resume or a later script sees what was trained
    # Data parallelism: a plain start with RANKS above 1 launches the ranks and waits for them here
    started = data_parallel(cfg, __file__, argv, cfg.BATCH_SIZE)
    if started is None:
        return
    cfg, layout = started
    if not layout.writer:  # a follower: opens the data rank 0 opened, trains its share of every stage rank 0 runs
        return follow(lambda source: tuple(s.to(cfg.DEVICE) for s in open_splits(source, layout.threads)[1:3]))
    torch.manual_seed(cfg.SEED)
    with out_dir_lock(cfg.OUT_DIR, "train_baseline.py"), ranks_working(layout):
        train, val = (split.to(cfg.DEVICE) for split in load_splits(cfg, layout))
        model, recipe = build(cfg, train)
        # Train (resumes an unfinished OUT_DIR/baseline.pth), checkpointing every epoch
        path = os.path.join(cfg.OUT_DIR, ARTIFACTS["baseline"])
        made_from = {k: getattr(cfg, k) for k in ("ARCH", "LABEL_SMOOTHING", "VAL_SIZE", "TRAIN_SUBSET")}
        if cfg.IMAGE_SIZE != 32:  # only then, so that checkpoints made before the option still resume
            made_from["IMAGE_SIZE"] = cfg.IMAGE_SIZE
        if cfg.WHITEN_STEM:  # only then, so that checkpoints made before the option still resume
            made_from.update({k: getattr(cfg, k) for k in ("WHITEN_STEM", "WHITEN_IMAGES")})
        stage = Stage("baseline", "baseline", path, cfg.DEVICE, made_from,
                      {"classes": train.classes, "config": asdict(cfg)})
        t0 = time.time()
        progress = fit(model, cross_entropy_objective(cfg.LABEL_SMOOTHING), recipe, train, val, stage)
        # Summary: validation accuracy of the final weights in float32 (the test split is evaluate_results.py's)
        val_acc = model_accuracy(model, val, cfg.DEVICE, 512)
        print(f"baseline: val_acc {val_acc:.2f}% after {progress.epoch} epochs ({time.time() - t0:.0f}s this run), "
              f"saved {path} ({os.path.getsize(path) / 2**20:.1f} MiB); torch {versions()['torch']}")
        print("next: python compress_model.py")


if __name__ == "__main__":
    run_cli(main)
