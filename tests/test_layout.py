"""The layout a run picks on the machines users have (cores faked where this one differs): RANKS=auto never
refuses and gives every rank 32 images a step or more; only BatchNorm's statistics are averaged; the data is one
copy a machine; a model that crashed torch's channels-last kernels trains contiguous."""
import os
import subprocess
import sys

import pytest
import torch

import train_baseline
import utils.dist
from conftest import CLASSES, tiny_model, write_imagefolder
from utils.config import UserError
from utils.data import ImageRows, choose_data_mode, load_dataset, train_val_split
from utils.device import cores
from utils.dist import MIN_SHARE, average_batchnorm, in_job, plan_ranks
from utils.models import ResNet
from utils.train import channels_last_safe, placed_for_training

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("n_cores, expected", [(1, (1, 1)), (2, (2, 1)), (6, (6, 1)), (7, (7, 1)), (12, (6, 2)),
                                               (24, (8, 3)), (64, (8, 8)), (256, (8, 32))])
def test_auto_puts_the_most_cores_to_work_with_32_images_a_rank_or_more(n_cores, expected):
    ranks, threads = plan_ranks("auto", "cpu", n_cores, 256)
    assert (ranks, threads) == expected
    assert 256 // ranks >= MIN_SHARE and ranks * threads <= n_cores


def test_auto_is_one_process_when_the_batch_is_too_small_to_share():
    assert plan_ranks("auto", "cpu", 2, 48) == (1, 2)


def test_auto_on_cuda_is_a_rank_per_gpu_and_any_gpu_count_takes_the_batch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert plan_ranks("auto", "cuda", 16, 512)[0] == 3


def test_more_ranks_than_images_a_step_is_refused_in_one_line():
    with pytest.raises(UserError, match="BATCH_SIZE=4 gives no image to some of 5 ranks"):
        plan_ranks("5", "cpu", 2, 4)


def test_cores_come_from_the_affinity_mask(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3, 5})
    assert cores() == 3


@pytest.mark.parametrize("n_cores, expected", [(12, (6, 2)), (64, (8, 8))])
def test_a_plain_start_with_the_default_constants_launches_a_layout_that_fits(imagefolder, tmp_path, monkeypatch,
                                                                              n_cores, expected):
    """`python train_baseline.py` (RANKS=auto, BATCH_SIZE=256) on a machine of 12 or 64 cores: the launcher is asked
    for that layout (faked here: the ranks are not started)."""
    launched = []
    monkeypatch.delenv("RANKS")
    monkeypatch.setattr(utils.dist, "cores", lambda: n_cores)
    monkeypatch.setattr(utils.dist, "launch", lambda script, argv, ranks, threads: launched.append((ranks, threads)))
    train_baseline.main([f"--DATA_DIR={imagefolder}", f"--OUT_DIR={tmp_path}"])
    assert launched == [expected]


@pytest.fixture(scope="module")
def bigger_imagefolder(tmp_path_factory):
    """400 training images: more than one default batch of 256 after 40 held out."""
    return write_imagefolder(tmp_path_factory.mktemp("bigger"), 400, 40)


def test_a_plain_start_on_six_cores_trains_with_the_default_batch_split_unevenly(bigger_imagefolder, tmp_path):
    """`python train_baseline.py` with the default RANKS and BATCH_SIZE on a machine that reports 6 cores (its
    affinity mask faked in the launching process): 6 ranks of 43 or 42 images a step train, and learn."""
    env = {k: v for k, v in os.environ.items() if k != "RANKS"}
    fake = ("import os, runpy, sys; os.sched_getaffinity = lambda pid: set(range(6)); sys.argv = sys.argv[1:]; "
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    flags = [f"--DATA_DIR={bigger_imagefolder}", f"--OUT_DIR={tmp_path}", "--EPOCHS=5", "--VAL_SIZE=40",
             "--ARCH=resnet_s2_w32", "--AMP_DTYPE=float32", "--LR=0.05"]
    proc = subprocess.run([sys.executable, "-c", fake, os.path.join(ROOT, "train_baseline.py")] + flags, env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "layout: 6 rank(s) x 1 thread(s)" in proc.stdout
    assert "each step's 256 images split 43 or 42 a rank" in proc.stdout
    history = torch.load(tmp_path / "baseline.pth", weights_only=True)["history"]
    assert history[-1]["loss"] < history[0]["loss"], history


def test_only_batchnorm_statistics_are_averaged_over_the_ranks(monkeypatch):
    """A constant float buffer (a normalisation's mean, say) stays as it is; BatchNorm's running statistics are
    summed over the ranks and divided by their number."""
    model = tiny_model()
    model.register_buffer("constant", torch.full((3,), 7.0))
    reduced = []
    monkeypatch.setattr(utils.dist, "world", lambda: 2)
    monkeypatch.setattr(utils.dist.dist, "all_reduce", lambda t: (reduced.append(t), t.mul_(2)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with in_job():
        average_batchnorm(model)
    after = model.state_dict()
    stats = [k for k in after if k.endswith(("running_mean", "running_var"))]
    assert stats and len(reduced) == len(stats)
    assert all(torch.equal(after[k], before[k]) for k in after if k not in stats)
    assert all(torch.allclose(after[k], before[k]) for k in stats)


def test_the_memory_check_counts_one_copy_a_machine_whatever_its_ranks(monkeypatch, capsys):
    """10,000 images of 3x32x32 bytes (29 MiB) fit 50 MiB once with the margin: ram at any number of ranks."""
    monkeypatch.setenv("DATA_MEMORY_AVAILABLE", str(50 * 2**20))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert choose_data_mode("auto", 10000, 32) == "ram"
    assert "one copy a machine" in capsys.readouterr().out


def test_the_splits_are_rows_of_the_memory_mapped_cache_not_copies(imagefolder, tmp_path):
    data = load_dataset(imagefolder, False, str(tmp_path), 32, "ram")
    again = load_dataset(imagefolder, False, str(tmp_path), 32, "ram")  # what another rank reads
    train, val = train_val_split(again["train"], 40, 0)
    assert isinstance(train.x, ImageRows) and train.x.images is again["train"].x
    assert torch.equal(train.x[torch.arange(5)], data["train"].x[train.x.rows[:5]])
    assert train.classes == sorted(CLASSES) and len(train.x) + len(val.x) == len(data["train"].x)


def test_a_model_that_crashed_channels_last_kernels_trains_contiguous(capsys):
    narrow = ResNet(stem="cifar", widths=(8, 16, 32, 64), blocks=(1, 1, 1, 1), num_classes=4, image_size=48)
    wide = ResNet(stem="cifar", widths=(16, 32, 64, 128), blocks=(1, 1, 1, 1), num_classes=4, image_size=48)
    small = ResNet(stem="cifar", widths=(8, 16, 32, 64), blocks=(1, 1, 1, 1), num_classes=4, image_size=32)
    assert [channels_last_safe(m) for m in (narrow, wide, small)] == [False, True, True]
    placed = placed_for_training(narrow, "cpu", channels_last=True)
    assert placed.conv1.weight.is_contiguous() and "trains contiguous" in capsys.readouterr().out
    assert not placed_for_training(wide, "cpu", channels_last=True).conv1.weight.is_contiguous()

