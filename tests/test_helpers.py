"""Helpers never change the model they are given (training flag, memory format, dtype, device, weights), and the
choices of the GPU path (bf16 autocast, the loss read once per epoch, float16 refused, measuring on the training
device) hold on the CPU; test_benchmark.py runs scripts/gpu_check.sh."""
import json

import torch

import train_baseline
from conftest import assert_one_line_error, cli, small_model, tiny_data, tiny_model
from utils import search as search_module
from utils import sensitivity as sensitivity_module
from utils.checkpoint import count_params, cpu_copy
from utils.data import Split, batches, num_batches
from utils.device import autocast, exact_float32
from utils.measure import Timing, eager_latency, model_accuracy
from utils.prune import magnitude_masks, structured_prune
from utils.quantize import Quantization, export_onnx, dynamic_quant_model
from utils.search import SearchContext, measure_candidate, reference_point
from utils.sensitivity import sensitivity_analysis
from utils.train import Stage, TrainRecipe, cross_entropy_objective, fit, sgd_one_cycle, train_one_epoch


def live_model(make=tiny_model):
    """A model (of `make`) as a training loop holds it: training mode, channels-last, one layer under a pruning
    mask."""
    model = make().train().to(memory_format=torch.channels_last)
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
    eager_latency(model, torch.rand(64, 3, 32, 32), Timing(threads=1, runs_b1=2, runs_b64=1, warmup=1))
    cpu_copy(model)
    count_params(model)
    dynamic_quant_model(model)
    structured_prune(model, {"layer1": 4, "layer1.0": 4})
    assert_unchanged(model, before)
    assert torch.get_num_threads() == 2, "the latency helper must restore the thread count"


def test_sensitivity_and_reference_point_leave_the_model_as_it_was(tmp_path):
    model = live_model(small_model)  # what runs once per layer, on fewer layers
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


def test_training_sums_the_loss_as_adding_each_step_on_the_host_did():
    """The epoch's loss, summed on the device and read once, is the float64 sum of each step's loss.item() times
    its images."""
    model, (x, y) = tiny_model(), tiny_data(48)
    seen = []

    def objective(m, batch):
        loss = torch.nn.functional.cross_entropy(m(batch.x), batch.y)
        seen.append((loss.item(), len(batch.y)))
        return loss
    recipe = TrainRecipe(lr=0.05, epochs=2, batch_size=16, momentum=0.9, weight_decay=0.0, seed=0)
    opt, sched = sgd_one_cycle(model, recipe, num_batches(48, 16, True))
    loader = batches(x, y, 16, "cpu", shuffle=True, train=True, generator=torch.Generator().manual_seed(0))
    summed, images = train_one_epoch(model, objective, opt, sched, loader, 3, "test")
    total = 0.0
    for value, n in seen:
        total += value * n
    assert len(seen) == 3 and images == 48 and summed == total


def test_float16_training_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    code, _, err = cli(train_baseline.main, [f"--OUT_DIR={tmp_path}", "--AMP_DTYPE=float16"], capsys, monkeypatch)
    assert_one_line_error(code, err, "float16", "gradient scaler", "bfloat16")


def recorded_devices(monkeypatch, module):
    """The `device` argument of every model_accuracy call made through `module`."""
    calls, real = [], module.model_accuracy

    def spy(model, split, device="cpu", *args, **kwargs):
        calls.append(str(device))
        return real(model, split, device, *args, **kwargs)
    monkeypatch.setattr(module, "model_accuracy", spy)
    return calls


def test_candidates_and_the_sensitivity_analysis_are_measured_on_the_training_device(tmp_path, monkeypatch):
    """'cpu:0' stands for a GPU here: a helper that ignored the training device would measure on plain 'cpu'."""
    model, val = cpu_copy(small_model()), Split(*tiny_data(32, 1), ["a", "b", "c", "d"])
    quant = Quantization(tiny_data(16)[0].float() / 255)
    ctx = SearchContext(val=val, base_correct=torch.ones(32, dtype=torch.bool), max_drop=100.0, quant=quant,
                        timing=Timing(threads=1, runs_b1=2, runs_b64=1, warmup=1), x_latency=torch.rand(4, 3, 32, 32),
                        work_dir=str(tmp_path), device="cpu:0")
    ctx.reference = {"bytes": 10**6, "macs": 10**9, "b1_ms": 1.0, "b64_ms": 10.0}
    calls = recorded_devices(monkeypatch, search_module)
    measure_candidate("c", model, ctx, None, 0, kind="student")
    assert calls == ["cpu:0"]
    calls = recorded_devices(monkeypatch, sensitivity_module)
    monkeypatch.setattr(sensitivity_module, "int8_sensitivity", lambda *args: {})  # ONNX Runtime's, on the CPU
    sensitivity_analysis(model, None, quant, val, device="cpu:0")
    assert len(calls) > 2 and set(calls) == {"cpu:0"}


def test_exact_float32_works_beside_the_newer_precision_settings_and_restores_them():
    """torch 2.9 and later refuse the old allow_tf32 switches once the fp32_precision settings are used; the
    block uses whichever this torch has, and leaves them as they were."""
    matmul = torch.backends.cuda.matmul
    if not hasattr(matmul, "fp32_precision"):  # an older torch: the allow_tf32 switches
        with exact_float32():
            assert not matmul.allow_tf32
        return
    conv, before = torch.backends.cudnn.conv, (matmul.fp32_precision, torch.backends.cudnn.conv.fp32_precision)
    conv.fp32_precision = "tf32"
    try:
        with exact_float32():
            assert (matmul.fp32_precision, conv.fp32_precision) == ("ieee", "ieee")
        assert conv.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision, conv.fp32_precision = before
