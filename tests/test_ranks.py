"""Data parallelism on the CPU (gloo, 2 processes, tiny data): a step at 2 ranks is the step of one process on the
same global batch; the three scripts run under torchrun and from a plain start with --RANKS=2; the same seeds at
2 ranks give the same weights; a killed 2-rank run resumes to the uninterrupted weights; a rank that raises ends
the run with one line."""
import json
import os
import signal
import socket
import subprocess
import sys
import time

import onnxruntime
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import COMPRESS_FLAGS, EVAL_FLAGS, TRAIN_FLAGS, tiny_data
from utils.dist import Layout, all_gather_cat, follow, ranks_working, shard, share_splits
from utils.train import CrossEntropy, Stage, TrainRecipe, fit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "RANKS": "2"}  # the tests' own RANKS=1 (conftest) replaced
# every kind of training job (the teacher's logits, distillation, the control, a pruned model's fine-tuning), once,
# at 64 px from the files (issue 30: the stream path at 2 ranks); two epochs a stage, the least that shows learning.
# A student of 16 channels: 8 crash torch 2.14.1's channels-last 1x1 stride-2 conv backward from 48 px up.
TRAIN = TRAIN_FLAGS + ["--EPOCHS=2", "--IMAGE_SIZE=64", "--DATA_MODE=stream"]
COMPRESS = COMPRESS_FLAGS + ["--KD_EPOCHS=2", "--STUDENTS=stride2:16-32-64-128:1", "--FINAL_EPOCHS=0",
                             "--TEACHER_VIEWS=1", "--DATA_MODE=stream"]
EVALUATE = EVAL_FLAGS + ["--DATA_MODE=stream"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def no_batchnorm_model():
    """A small network without BatchNorm: one step of it depends on the batch only through the mean gradient."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 15 * 15, 4))
    model.spec = {"test": "no batchnorm"}
    return model


RECIPE = TrainRecipe(lr=0.05, epochs=1, batch_size=16, momentum=0.9, weight_decay=5e-4, seed=0)


def train_no_batchnorm(folder):
    """One epoch (5 steps of 16) of the network above; its weights."""
    model = no_batchnorm_model()
    fit(model, CrossEntropy(0.0), RECIPE, tiny_data(80), tiny_data(16, 1),
        Stage("student", "student", os.path.join(folder, "m.pth"), "cpu"))
    return model.state_dict()


def rank_worker(rank, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    if rank:
        return follow(lambda train, val: (train, val))
    with ranks_working(Layout(2, 1, 2, 0)):
        share_splits((tiny_data(80), tiny_data(16, 1)))
        torch.save(train_no_batchnorm(folder), os.path.join(folder, "two_ranks.pt"))


def test_steps_at_two_ranks_equal_the_steps_of_one_process_on_the_same_global_batches(tmp_path):
    """Each rank takes half of every global batch and the gradients are averaged: without BatchNorm the weights
    after 5 steps are those of one process, to float rounding (a wrong share or a sum for a mean is far off)."""
    mp.spawn(rank_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    two = torch.load(tmp_path / "two_ranks.pt")
    (tmp_path / "one").mkdir()
    one = train_no_batchnorm(str(tmp_path / "one"))
    start = no_batchnorm_model().state_dict()
    for k in one:
        assert not torch.equal(one[k], start[k]), f"{k} did not train"
        assert torch.allclose(two[k], one[k], atol=1e-6, rtol=1e-5), f"{k}: {(two[k] - one[k]).abs().max()}"


def shares_worker(rank, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    rows = shard(7)
    torch.save(((rows.start, rows.stop), all_gather_cat(torch.arange(7)[rows])), os.path.join(folder, f"{rank}.pt"))
    dist.destroy_process_group()


def test_shares_cover_every_item_once_and_gather_back_in_order(tmp_path):
    mp.spawn(shares_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    (rows0, all0), (rows1, all1) = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert (rows0, rows1) == ((0, 4), (4, 7))
    assert torch.equal(all0, torch.arange(7)) and torch.equal(all1, torch.arange(7))


def run(command, **kwargs):
    proc = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL, env=ENV, cwd=ROOT,
                          timeout=300, **kwargs)
    return proc


def script(name, out, data, flags):
    return [os.path.join(ROOT, name), f"--DATA_DIR={data}", f"--OUT_DIR={out}"] + flags


def state(folder, name="baseline.pth"):
    return torch.load(os.path.join(folder, name), weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def torchrun_run(imagefolder, tmp_path_factory):
    """The three scripts under torchrun with 2 ranks: (their folder, their outputs)."""
    folder, outputs = tmp_path_factory.mktemp("torchrun"), []
    for name, flags in (("train_baseline.py", TRAIN), ("compress_model.py", COMPRESS), ("evaluate_results.py", EVALUATE)):
        proc = run(TORCHRUN + script(name, folder, imagefolder, flags))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        outputs.append(proc.stdout)
    return folder, outputs


def test_the_three_scripts_run_under_torchrun_at_two_ranks_and_their_files_load(torchrun_run):
    folder, outputs = torchrun_run
    assert all("layout: 2 rank(s) x 1 thread(s)" in out for out in outputs[:2])
    assert outputs[0].count("baseline   epoch   1/2") == 1  # one writer prints
    assert torch.load(folder / "pruned.pth", weights_only=True)["config"]["RANKS"] == "2"
    lines = [json.loads(line) for line in open(folder / "metrics.jsonl")]
    assert {line["stage"] for line in lines} == {"baseline", "student", "scratch", "struct1", "sparse1"}
    assert {line["ranks"] for line in lines} == {2} and all(line["images_per_s"] > 0 for line in lines)
    for stage in ("baseline", "student", "scratch"):  # learning at 2 ranks, not only running
        losses = [line["loss"] for line in lines if line["stage"] == stage]
        assert losses[-1] < losses[0], (stage, losses)
    assert json.load(open(folder / "results.json"))["rows"]
    session = onnxruntime.InferenceSession(str(folder / "int8.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [3, 64, 64]


def test_a_killed_plain_start_at_two_ranks_resumes_to_the_weights_of_the_uninterrupted_torchrun(torchrun_run,
                                                                                                imagefolder, tmp_path):
    """A plain start with RANKS=2 launches the ranks itself; killed after its first epoch and started again, it
    ends with the weights of the torchrun run (the same seeds at the same number of ranks: the same weights)."""
    command = [sys.executable] + script("train_baseline.py", tmp_path, imagefolder, TRAIN)
    log = open(tmp_path / "first.err", "w")
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=ENV, cwd=ROOT)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 1) and first.poll() is None:
        assert time.time() < deadline, "the first epoch did not end"
        time.sleep(0.02)
    first.send_signal(signal.SIGTERM)  # `kill PID`: the launcher ends both ranks, then itself
    assert first.wait(timeout=60) == 130
    said = [line for line in (tmp_path / "first.err").read_text().replace("\r", "\n").splitlines()
            if "interrupted" in line or "error" in line.lower()]
    assert said == ["interrupted (SIGTERM): rerun the same command to resume from the last finished epoch"], said
    again = run(command)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "layout: 2 rank(s) x 1 thread(s)" in again.stdout
    assert "resuming" in again.stdout, "the run was not killed before its end"
    a, b = state(torchrun_run[0]), state(tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_checkpoint_of_another_number_of_ranks_is_refused_in_one_line(torchrun_run, imagefolder, tmp_path):
    """An unfinished 2-rank checkpoint, resumed by one process: one line, exit status 2."""
    ckpt = torch.load(torchrun_run[0] / "baseline.pth", weights_only=True)
    ckpt.update(epoch=1, finished=False)
    torch.save(ckpt, tmp_path / "baseline.pth")
    proc = run([sys.executable] + script("train_baseline.py", tmp_path, imagefolder, TRAIN + ["--RANKS=1"]))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "ranks" in proc.stderr.strip().splitlines()[-1]


def test_a_rank_that_raises_ends_the_whole_run_with_one_line(imagefolder, tmp_path):
    """Rank 0 stops at once (its OUT_DIR is in use); the other rank, waiting for the data, is ended too: exit
    status 2, one error line, well within a minute."""
    (tmp_path / ".lock").write_text(f"{os.getpid()} another run\n")
    t0 = time.time()
    proc = run([sys.executable] + script("train_baseline.py", tmp_path, imagefolder, TRAIN_FLAGS))
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 2 and len(errors) == 1 and "in use by" in errors[0], proc.stderr
    assert time.time() - t0 < 60


def test_a_batch_that_the_ranks_do_not_divide_is_refused_in_one_line(imagefolder, tmp_path):
    proc = run([sys.executable] + script("train_baseline.py", tmp_path, imagefolder, TRAIN_FLAGS + ["--BATCH_SIZE=33"]))
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: BATCH_SIZE=33 does not split into 2 equal shares: use a multiple of 2, or --RANKS with a divisor of it"]

