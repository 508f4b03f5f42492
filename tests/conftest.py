"""Tiny synthetic CIFAR-like data (ImageFolder and torchvision pickle layouts), a tiny pipeline run, the helpers
the test files share, and the slow tier (tests that run the pipeline or a script end to end)."""
import dataclasses
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from utils.checkpoint import Progress, load_checkpoint, load_model, write_checkpoint  # noqa: E402
from utils.config import run_cli  # noqa: E402  (the repository root is on the path from here)
from utils.models import ResNet  # noqa: E402
from utils.search import Entry  # noqa: E402

# One fixed thread count for every test: float sums (and so the tiny search's choices) depend on it, and the same
# seeds must give the same results on every run, whatever ran before in this process.
torch.set_num_threads(2)
# One process per script, as the tests call the scripts' main() in this one (a plain start's RANKS=auto would
# launch a rank per core); the data-parallel tests ask for their ranks with --RANKS or torchrun.
os.environ["RANKS"] = "1"

CLASSES = ["red", "green", "blue", "grey"]


def synthetic_images(n, seed):
    """n 32x32 RGB images whose class shows in colour and a stripe: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % len(CLASSES)
    images = rng.integers(0, 60, size=(n, 32, 32, 3), dtype=np.uint8)
    for i, label in enumerate(labels):
        if label < 3:
            images[i, :, :, label] += 150
        else:
            images[i] += 90
        images[i, 4 * label:4 * label + 4, :, :] = 255
    return images, labels


def write_imagefolder(root, n_train=240, n_test=80):
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        images, labels = synthetic_images(n, seed)
        for i, (img, label) in enumerate(zip(images, labels)):
            folder = os.path.join(root, split, CLASSES[label])
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(img).save(os.path.join(folder, f"{i:04d}.png"))
    return str(root)


def write_cifar_pickles(root, per_batch=40, n_test=40):
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for k, name in enumerate(names):
        images, labels = synthetic_images(n_test if name == "test_batch" else per_batch, seed=10 + k)
        data = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": data, "labels": labels.tolist()}, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": CLASSES}, f)
    return str(root)


# Helpers shared by the test files -------------------------------------------------------------------

def tiny_data(n=64, seed=0):
    """(x uint8, y) of n 32x32 images whose class (of 4) shows in one colour channel."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randint(0, 80, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    x[torch.arange(n), y % 3] += 150
    return x, y


def learnable_data(n, seed=0):
    """tiny_data with a white stripe at a row that tells each class apart (its colours alone leave two alike)."""
    x, y = tiny_data(n, seed)
    for row in range(4):
        x[y == row, :, 8 * row:8 * row + 4, :] = 255
    return x, y


# each training option of the shared recipe (the scripts' BN_MOMENTUM, BN_BIAS_LR, FREEZE_BN_WEIGHTS,
# ALTERNATE_FLIP) alone, and all of them with LOOKAHEAD, as TrainRecipe fields
OPTIONS = {"bn_momentum": dict(bn_momentum=0.4), "bn_bias_lr": dict(bn_bias_lr=64.0),
           "bn_weights_frozen": dict(bn_weights_frozen=True), "alternate_flip": dict(alternate_flip=True),
           "bundle": dict(bn_momentum=0.4, lookahead=5, bn_bias_lr=64.0, bn_weights_frozen=True,
                          alternate_flip=True)}


def assert_learns_as_the_plain_recipe(losses, plain):
    """The last five steps' mean loss under 0.4 of the first five's, and within 0.25 of the plain recipe's."""
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.4 * first and abs(last - sum(plain[-5:]) / 5) < 0.25, (first, last, sum(plain[-5:]) / 5)


def tiny_model():
    torch.manual_seed(0)
    return ResNet(stem="stride2", widths=(8, 16, 32, 64), num_classes=4)


def small_model():
    """Smaller than tiny_model (7 layers, one removable block): for what runs once per layer, like the
    sensitivity analysis."""
    torch.manual_seed(0)
    return ResNet(stem="cifar", widths=(8, 16), blocks=(2, 1), num_classes=4)


def cli(main, argv, capsys, monkeypatch):
    """Run a script's main as the shell would: returns (exit status, stdout, stderr)."""
    monkeypatch.setattr("sys.argv", ["script"] + argv)
    try:
        run_cli(main)
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *words):
    assert code == 2, err
    lines = err.strip().splitlines()  # progress bars of work done before the mistake showed may come first
    errors = [line for line in lines if "error" in line.lower()]
    assert len(errors) == 1 and lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert all(w in lines[-1] for w in words), lines[-1]


def no_temp_files(folder):
    return not [f for root, _, files in os.walk(folder) for f in files if ".tmp" in f]


@pytest.fixture(scope="session")
def imagefolder(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("imagefolder"))


# Tiny constants for each script: seconds per stage on 2 CPU cores. The baseline is the stride-2 ResNet-18 at half
# width (resnet_s2_w32): the default's code path at a quarter of its MACs.
# float32 training (AMP_DTYPE=auto would pick bf16 on some CPUs only): the same results on every machine.
# LR 0.03: with the default frozen BatchNorm scales the blocks do not start as the identity, and 18 steps at 0.01
# left the baseline at 50% on this data (100% at 0.03, or at 0.01 for 6 epochs; the old recipe: 100% at 0.01).
TRAIN_FLAGS = ["--EPOCHS=3", "--BATCH_SIZE=32", "--VAL_SIZE=40", "--LR=0.03", "--ARCH=resnet_s2_w32",
               "--AMP_DTYPE=float32", "--DEVICE=cpu"]
# A budget no tiny model can break (MAX_ACC_DROP=100), so that the search walks every step; two students (a
# stride-2 and a CIFAR-style one), of which the search picks one.
COMPRESS_FLAGS = ["--KD_EPOCHS=3", "--BATCH_SIZE=32", "--STUDENTS=stride2:24-48-96-192:2,cifar:16-32-64-128:2",
                  "--KD_LR=0.01", "--FINETUNE_LR=0.005",
                  "--STRUCT_STEPS=1", "--STRUCT_EPOCHS=1", "--AGP_STEPS=1", "--AGP_EPOCHS=1", "--FINAL_EPOCHS=1",
                  "--SENS_IMAGES=40", "--CALIB_IMAGES=64", "--LATENCY_RUNS=10", "--MAX_ACC_DROP=100",
                  "--AMP_DTYPE=float32", "--DEVICE=cpu"]
EVAL_FLAGS = ["--RUNS_B1=100", "--RUNS_B64=3", "--WARMUP=2", "--THREADS=2"]


@pytest.fixture(scope="session")
def pipeline(imagefolder, tmp_path_factory):
    """All three scripts run once on the tiny data; returns the output folder."""
    import compress_model
    import evaluate_results
    import train_baseline
    out = str(tmp_path_factory.mktemp("runs"))
    common = [f"--DATA_DIR={imagefolder}", f"--OUT_DIR={out}"]
    train_baseline.main(common + TRAIN_FLAGS)
    compress_model.main(common + COMPRESS_FLAGS)
    evaluate_results.main(common + EVAL_FLAGS)
    return out


# Fixtures that run the tiny pipeline (or benchmark.py / gpu_check.sh): a test using one is in the slow tier.
SLOW_FIXTURES = {"pipeline", "smoke_run", "resumed_full_run", "archive", "torchrun_run", "stream_pipeline"}


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


def log_entry(**fields):
    """A search log entry (utils.search.Entry) with the given fields and None for every other required one: what
    the budget logic and the walks read, without measuring a model."""
    return Entry(**{**{f.name: None for f in dataclasses.fields(Entry) if f.default is dataclasses.MISSING}, **fields})


def reloaded(model, tmp_path):
    """`model` written as a pruned.pth checkpoint and loaded back (torch.load with weights_only=True)."""
    path = str(tmp_path / "pruned.pth")
    write_checkpoint(path, {"stage": "pruned", "model": model.spec}, model, Progress(1, 1))
    return load_model(load_checkpoint(path, "pruned"), path)
