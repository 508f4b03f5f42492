"""Data parallelism on the CPU (gloo, tiny data): a step at 3 ranks, the global batch split unevenly, is the step of
one process on the same global batch; the three scripts run under torchrun and from a plain start with --RANKS=2;
the same seeds at 2 ranks give the same weights; a killed 2-rank run resumes to the uninterrupted weights, and at
1 rank; a rank that raises, or stops answering, ends the run with one line; a rank ends with its launcher."""
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field

import onnxruntime
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from conftest import (COMPRESS_FLAGS, EVAL_FLAGS, OPTIONS, TRAIN_FLAGS, assert_learns_as_the_plain_recipe,
                      learnable_data, tiny_data, tiny_model)
import psutil

from utils.dist import Layout, all_gather_cat, follow, in_job, join, ranks_working, shard, share_data
from utils.train import CrossEntropy, Stage, TrainRecipe, distillation_objective, fit

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


def rank_worker(rank, port, folder, ranks):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(ranks))
    layout = Layout(rank=rank, local_rank=rank, world=ranks, local_world=ranks, cores=2, threads=1)
    join(layout, rank_timeout=60)
    torch.set_num_threads(1)
    if rank:
        return follow(lambda splits: splits)
    with ranks_working(layout):
        share_data((tiny_data(80), tiny_data(16, 1)))
        torch.save(train_no_batchnorm(folder), os.path.join(folder, "ranks.pt"))


def test_steps_at_three_ranks_equal_the_steps_of_one_process_on_the_same_global_batches(tmp_path):
    """Each rank takes its share of every global batch of 16 (6, 5 and 5 images), its loss weighted by its share,
    and the gradients are averaged: without BatchNorm the weights after 5 steps are those of one process, to float
    rounding (an unweighted uneven share, a wrong share or a sum for a mean is far off)."""
    mp.spawn(rank_worker, args=(free_port(), str(tmp_path), 3), nprocs=3)
    two = torch.load(tmp_path / "ranks.pt")
    (tmp_path / "one").mkdir()
    one = train_no_batchnorm(str(tmp_path / "one"))
    start = no_batchnorm_model().state_dict()
    for k in one:
        assert not torch.equal(one[k], start[k]), f"{k} did not train"
        assert torch.allclose(two[k], one[k], atol=1e-6, rtol=1e-5), f"{k}: {(two[k] - one[k]).abs().max()}"


@dataclass
class RecordedLoss:
    """An objective (default cross-entropy) that keeps each step's value (on rank 0: its share's); picklable, as
    a job's objective is."""
    objective: object = None
    losses: list = field(default_factory=list)

    def to(self, device):
        return self

    def __call__(self, model, batch):
        loss = self.objective(model, batch) if self.objective else F.cross_entropy(model(batch.x), batch.y)
        self.losses.append(loss.item())
        return loss


def options_worker(rank, port, folder):
    """At 2 ranks, one epoch (20 steps of 32 images) of tiny_model with the plain recipe and with each option;
    then distilled (KD and DKD) from the plain recipe's model."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    layout = Layout(rank=rank, local_rank=rank, world=2, local_world=2, cores=2, threads=1)
    join(layout, rank_timeout=60)
    torch.set_num_threads(1)
    if rank:
        return follow(lambda splits: splits)
    with ranks_working(layout):
        train, val = learnable_data(640), learnable_data(16, 1)
        share_data((train, val))
        losses, models = {}, {}
        for name, options in {"plain": {}, **OPTIONS}.items():
            losses[name] = RecordedLoss()
            recipe = TrainRecipe(lr=0.05, epochs=1, batch_size=32, momentum=0.9, weight_decay=0.0, seed=0, **options)
            models[name] = tiny_model()
            fit(models[name], losses[name], recipe, train, val, Stage("student", name, os.path.join(folder,
                                                                                                  f"{name}.pth"), "cpu"))
        recipe = TrainRecipe(lr=0.05, epochs=1, batch_size=32, momentum=0.9, weight_decay=0.0, seed=1)
        for name, beta in (("kd", None), ("dkd", 8.0)):
            losses[name] = RecordedLoss(distillation_objective(models["plain"].eval(), 4.0, 0.5, dkd_beta=beta))
            fit(tiny_model(), losses[name], recipe, train, val, Stage("student", name, os.path.join(folder,
                                                                                              f"{name}.pth"), "cpu"))
        torch.save({name: loss.losses for name, loss in losses.items()}, os.path.join(folder, "losses.pt"))


def test_each_recipe_option_learns_at_two_ranks_as_the_plain_recipe(tmp_path):
    """BN_MOMENTUM, BN_BIAS_LR, FREEZE_BN_WEIGHTS, ALTERNATE_FLIP and all of them with LOOKAHEAD, trained by two
    ranks: rank 0's loss falls as the plain recipe's does; KD and DKD from that plain model: each loss falls."""
    mp.spawn(options_worker, args=(free_port(), str(tmp_path)), nprocs=2)
    losses = torch.load(tmp_path / "losses.pt")
    for name in OPTIONS:
        assert len(losses[name]) == 20, name
        assert_learns_as_the_plain_recipe(losses[name], losses["plain"])
    for name in ("kd", "dkd"):  # their own losses' scales: each falls as conftest's options must
        first, last = sum(losses[name][:5]) / 5, sum(losses[name][-5:]) / 5
        assert len(losses[name]) == 20 and last < 0.4 * first, (name, first, last)


def shares_worker(rank, port, folder):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    rows = shard(7)
    with pytest.raises(RuntimeError, match="inside a job"):  # outside a job a collective could pair with a wrong one
        all_gather_cat(torch.arange(7)[rows])
    with in_job():
        gathered = all_gather_cat(torch.arange(7)[rows])
    torch.save(((rows.start, rows.stop), gathered), os.path.join(folder, f"{rank}.pt"))
    dist.destroy_process_group()


def test_shares_cover_every_item_once_and_gather_back_in_order_inside_a_job_only(tmp_path):
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
    (tmp_path / "one").mkdir()
    shutil.copy(tmp_path / "baseline.pth", tmp_path / "one" / "baseline.pth")  # the killed run's, for one rank
    again = run(command)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "layout: 2 rank(s) x 1 thread(s)" in again.stdout
    assert "resuming" in again.stdout, "the run was not killed before its end"
    a, b = state(torchrun_run[0]), state(tmp_path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the same killed stage resumed by one process (another machine, --RANKS=1 to debug): it says so and finishes
    one = run([sys.executable] + script("train_baseline.py", tmp_path / "one", imagefolder, TRAIN + ["--RANKS=1"]))
    assert one.returncode == 0, one.stderr[-2000:]
    assert "resuming" in one.stdout and "the world size changed from 2 to 1 rank(s)" in one.stdout, one.stdout
    assert torch.load(tmp_path / "one" / "baseline.pth", weights_only=True)["finished"]


def test_a_rank_that_raises_ends_the_whole_run_with_one_line(imagefolder, tmp_path):
    """Rank 0 stops at once (its OUT_DIR is in use); the other rank, waiting for the data, is ended too: exit
    status 2, one error line, well within a minute."""
    (tmp_path / ".lock").write_text(f"{os.getpid()} another run\n")
    t0 = time.time()
    proc = run([sys.executable] + script("train_baseline.py", tmp_path, imagefolder, TRAIN_FLAGS))
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert proc.returncode == 2 and len(errors) == 1 and "in use by" in errors[0], proc.stderr
    assert time.time() - t0 < 60


def ranks_of(proc):
    """{RANK: psutil.Process} of the ranks a plain start launched."""
    found = {}
    for child in psutil.Process(proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "RANK" in child.environ():
                found[int(child.environ()["RANK"])] = child
    return found


def started_training(imagefolder, folder, flags):
    """A plain start at 2 ranks, once its first epoch has ended: (the launcher's Popen, its ranks)."""
    command = [sys.executable] + script("train_baseline.py", folder, imagefolder, TRAIN_FLAGS + ["--EPOCHS=40"] + flags)
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT,
                            stdin=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ((folder / "metrics.jsonl").exists() and (folder / "metrics.jsonl").read_text().count("\n") >= 1):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.05)
    return proc, ranks_of(proc)


def test_a_rank_that_stops_answering_ends_the_run_within_the_timeout_with_one_line(imagefolder, tmp_path):
    """Rank 1 stopped (SIGSTOP) mid-epoch: the heartbeats name it after RANK_TIMEOUT=5 s, the run ends with exit
    status 2 and one line, and no process of it is left (the stopped rank included)."""
    proc, ranks = started_training(imagefolder, tmp_path, ["--RANK_TIMEOUT=5"])
    ranks[1].send_signal(signal.SIGSTOP)
    t0 = time.time()
    try:
        _, stderr = proc.communicate(timeout=45)
    finally:
        with contextlib.suppress(psutil.Error):
            ranks[1].kill()
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if "error" in line.lower()]
    assert proc.returncode == 2 and len(errors) == 1, stderr[-2000:]
    assert errors[0].startswith(f"error: rank 1 (pid {ranks[1].pid} on ") and "stopped answering for 5 s" in errors[0]
    assert time.time() - t0 < 30 and not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                                              for p in ranks.values())


def test_the_ranks_end_within_seconds_of_their_killed_launcher(imagefolder, tmp_path):
    """The launcher alone SIGKILLed (the OOM killer, say): its ranks, in sessions of their own, see it gone and end,
    so the folder's lock is free for a rerun."""
    proc, ranks = started_training(imagefolder, tmp_path, [])
    proc.kill()
    proc.communicate()
    deadline = time.time() + 10
    while any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks.values()):
        if time.time() > deadline:
            for p in ranks.values():
                p.kill()
            raise AssertionError("a rank outlived its launcher by 10 s")
        time.sleep(0.1)

