"""Helpers never change the model they are given (training flag, memory format, dtype, device, weights), and the
GPU profile's code paths (bf16 autocast, the GPU constants, scripts/gpu_check.sh) run on the CPU."""
import json
import os
import subprocess
import tarfile

import torch

from conftest import COMPRESS_FLAGS, EVAL_FLAGS, TRAIN_FLAGS
from test_units import tiny_data, tiny_model
from utils.checkpoint import count_params, cpu_copy
from utils.data import Split
from utils.device import autocast
from utils.measure import Timing, eager_latency, model_accuracy
from utils.prune import magnitude_masks, structured_prune
from utils.quantize import Quantization, export_onnx, seed_recipe_model
from utils.search import SearchContext, reference_point
from utils.sensitivity import sensitivity_analysis
from utils.train import Stage, TrainRecipe, cross_entropy_objective, fit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def live_model():
    """A model as a training loop holds it: training mode, channels-last, one layer under a pruning mask."""
    model = tiny_model().train().to(memory_format=torch.channels_last)
    magnitude_masks(model, {"layer1.0.conv1": 0.5})
    return model


def snapshot(model):
    """Everything a helper could change in place: each module's training flag, each tensor's device, dtype,
    memory format and values."""
    modes = [m.training for m in model.modules()]
    tensors = {k: (v.device, v.dtype, v.is_contiguous(memory_format=torch.channels_last) if v.dim() == 4 else None,
                   v.detach().clone()) for k, v in model.state_dict().items()}
    return modes, tensors


def assert_unchanged(model, before):
    modes, tensors = snapshot(model)
    assert modes == before[0], "training flags changed"
    assert tensors.keys() == before[1].keys()
    for k, (device, dtype, cl, value) in tensors.items():
        b = before[1][k]
        assert (device, dtype, cl) == b[:3], f"{k}: device, dtype or memory format changed"
        assert torch.equal(value, b[3]), f"{k}: values changed"


def test_export_onnx_leaves_the_model_as_it_was(tmp_path):
    model = live_model()
    before = snapshot(model)
    export_onnx(model, str(tmp_path / "m.onnx"))
    assert_unchanged(model, before)


def test_accuracy_latency_copies_and_counts_leave_the_model_as_it_was():
    model = live_model()
    before = snapshot(model)
    val = Split(*tiny_data(24), ["a", "b", "c", "d"])
    model_accuracy(model, val)
    model_accuracy(model, val, amp_dtype="bfloat16")
    eager_latency(model, torch.rand(64, 3, 32, 32), Timing(threads=1, runs_b1=2, runs_b64=1, warmup=1))
    cpu_copy(model)
    count_params(model)
    seed_recipe_model(model)
    structured_prune(model, {"layer1.0": 4})
    assert_unchanged(model, before)
    assert torch.get_num_threads() == 2, "the latency helper must restore the thread count"


def test_sensitivity_and_reference_point_leave_the_model_as_it_was(tmp_path):
    model = live_model()
    before = snapshot(model)
    val = Split(*tiny_data(16), ["a", "b", "c", "d"])
    quant = Quantization(tiny_data(16)[0].float() / 255)
    sensitivity_analysis(model, export_onnx(model, str(tmp_path / "f.onnx")), quant, val)
    ctx = SearchContext(val=val, base_correct=torch.ones(16, dtype=torch.bool), max_drop=0.5, quant=quant,
                        x_latency=torch.rand(64, 3, 32, 32),
                        timing=Timing(threads=1, runs_b1=2, runs_b64=1, warmup=1), work_dir=str(tmp_path))
    torch.save(model.state_dict(), tmp_path / "baseline.pth")
    reference_point(model, str(tmp_path / "baseline.pth"), 50.0, ctx)
    assert_unchanged(model, before)


def test_bf16_autocast_path_runs_on_cpu(tmp_path):
    model = tiny_model()
    with autocast("cpu", "bfloat16"):
        assert model(torch.rand(2, 3, 32, 32)).dtype == torch.bfloat16  # the autocast really is on
    recipe = TrainRecipe(lr=0.05, epochs=2, batch_size=16, momentum=0.9, weight_decay=5e-4, seed=0,
                         amp_dtype="bfloat16")
    progress = fit(model, cross_entropy_objective(0.0), recipe, tiny_data(), tiny_data(16, 1),
                   Stage("student", "student", str(tmp_path / "s.pth"), "cpu"))
    assert progress.finished and torch.isfinite(torch.tensor(progress.history[-1]["loss"]))
    assert all(p.dtype == torch.float32 for p in model.parameters()), "autocast must not change the weights"
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["stage"] for r in records] == ["student"] * 2 and records[0]["images_per_s"] > 0


def dedupe_by_name(flags):
    """--NAME=VALUE flags with each name once, the last value winning."""
    return list({f.split("=", 1)[0]: f for f in flags}.values())


def test_gpu_profile_runs_on_cpu_through_gpu_check(imagefolder, tmp_path):
    """scripts/gpu_check.sh as a borrowed GPU machine runs it, with --DEVICE=cpu and tiny constants: the data
    archive unpacked, the three scripts and benchmark.py with the GPU profile (bf16 autocast, CIFAR stems)."""
    archive = tmp_path / "cifar10.tar.xz"
    with tarfile.open(archive, "w:xz") as tar:
        tar.add(imagefolder, arcname="cifar10")
    short = ["--EPOCHS=1", "--KD_EPOCHS=1", "--AGP_STEPS=1", "--FINAL_EPOCHS=0", "--STUDENTS=cifar:8-16-32-64:1"]
    flags = ["--DEVICE=cpu", "--REFERENCE_SECONDS=0.5"] + TRAIN_FLAGS[:-1] + COMPRESS_FLAGS[:-1] + EVAL_FLAGS + short
    env = {**os.environ, "GPU_CHECK_ARCHIVE": str(archive), "OUT": str(tmp_path / "out"),
           "GPU_CHECK_FLAGS": " ".join(dedupe_by_name(flags))}
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh")], env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bench = json.load(open(tmp_path / "out" / "benchmark.json"))
    config = bench["results"]["config"]
    assert bench["profile"] == "gpu" and config["PROFILE"] == "gpu" and config["DEVICE"] == "cpu"
    assert {c["target"] for c in bench["checks"]} >= {"baseline training within 3 minutes"}
    assert set(bench["stage_speeds"]) == {"baseline", "student", "scratch", "struct1", "sparse1"}
    assert bench["reference_workload"]["images_per_s"] > 0
    search = json.load(open(tmp_path / "out" / "search.json"))
    assert search["config"]["AMP_DTYPE"] == "bfloat16" and search["config"]["TEACHER_VIEWS"] == 0
    assert "baseline" in proc.stdout and "img/s" in proc.stdout
    for name in ("results.md", "training.png", "gpu_check.log"):
        assert os.path.getsize(tmp_path / "out" / name) > 0
