"""The three scripts end to end on tiny data, and what their artifacts must satisfy."""
import json
import os

import onnx
import pytest
import torch

from utils.checkpoint import load_checkpoint, load_model
from utils.prune import weight_sparsity
from utils.sparse import load_sparse_onnx
from utils.data import load_dataset
from utils.measure import ort_predict, ort_session
from utils.models import parse_arch
from utils.search import score

STAGES = ["baseline", "scratch", "student", "pruned", "int8", "int8_sparse", "seed_recipe"]
REQUIRED = ["stage", "artifact", "runtime", "accuracy", "size_bytes", "params", "nonzero_params", "latency_b1_ms",
            "latency_b64_ms"]


def test_results_have_a_measured_row_per_stage(pipeline):
    results = json.load(open(os.path.join(pipeline, "results.json")))
    assert [r["stage"] for r in results["rows"]] == STAGES
    for row in results["rows"]:
        assert all(k in row for k in REQUIRED), row.keys()
        assert row["size_bytes"] == os.path.getsize(row["artifact"])
        assert 0 <= row["accuracy"] <= 100 and row["latency_b1_ms"] > 0 and row["latency_b64_ms"] > 0
        lo, hi = row["accuracy_ci95"]
        assert lo <= row["accuracy"] <= hi and hi - lo > 4  # 80 test images: wide, even at 100% (95.4-100)
        lo, hi = row["accuracy_drop_ci95"]
        assert lo <= row["accuracy_drop"] <= hi
    assert results["machine"]["threads"] == 2 and results["machine"]["onnxruntime"]
    assert results["config"]["RUNS_B1"] == 100
    baseline = results["rows"][0]
    assert baseline["accuracy"] > 50, "the baseline should learn the synthetic classes"
    table = open(os.path.join(pipeline, "results.md")).read()
    assert all(f"| {stage}" in table for stage in STAGES) and "paired drop 95%" in table


def test_int8_artifact_is_small_runs_alone_and_agrees_with_float(pipeline, imagefolder):
    int8_path, float_path = os.path.join(pipeline, "int8.onnx"), os.path.join(pipeline, "onnx", "pruned_fp32.onnx")
    # int8 weights: 4x smaller tensors, less the per-channel scales, int32 biases and the graph's own bytes, which
    # weigh on a tiny model; an fp16 file (at most 2x smaller) fails this
    assert os.path.getsize(float_path) / os.path.getsize(int8_path) >= 2.5
    ops = {n.op_type for n in onnx.load(int8_path).graph.node}
    assert "DequantizeLinear" in ops and "Conv" in ops
    # every Conv weight comes in through a DequantizeLinear of an int8 initializer
    graph = onnx.load(int8_path).graph
    int8_inits = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    dq_out = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    assert all(dq_out.get(n.input[1]) in int8_inits for n in graph.node if n.op_type == "Conv")
    # agreement of predictions with the pruned float model, on the test images
    test_x = load_dataset(imagefolder, False, pipeline)["test"][0].float() / 255
    pruned = load_model(load_checkpoint(os.path.join(pipeline, "pruned.pth"), "pruned"), "pruned.pth")
    with torch.no_grad():
        float_pred = pruned(test_x).argmax(1)
    int8_pred = ort_predict(ort_session(int8_path, 2))(test_x).argmax(1)
    assert (float_pred == int8_pred).float().mean() >= 0.9


def test_search_logs_candidates_and_ships_the_chosen_one(pipeline):
    search = json.load(open(os.path.join(pipeline, "search.json")))
    names = [c["name"] for c in search["candidates"]]
    students = ["student_stride2_24-48-96-192_2", "student_cifar_16-32-64-128_2"]
    assert names[:5] == students + ["struct1", "sparse1", "sparse2"]  # nothing breaks a budget of 100 points
    assert len(names) == 6 and names[5].endswith("_ft")  # the recovery fine-tuning of the first choice
    # the search walked from the student best by the objective (all are within the budget)
    picked = min(search["candidates"][:2], key=lambda c: score(c, search["objective"]))
    assert search["student"] == picked["arch"]
    student_ckpt = load_checkpoint(os.path.join(pipeline, "student.pth"), "student")
    assert student_ckpt["model"]["kwargs"]["stem"] == parse_arch(picked["arch"])["stem"]
    # same shape, same kernels: the sparse candidates share the latency measured on their structured parent
    assert [c["latency_measured_on"] for c in search["candidates"]] == students + ["struct1"] * 4
    chosen = next(c for c in search["candidates"] if c["name"] == search["chosen"])
    assert search["budget_met"] and chosen["within_budget"] and chosen["val_acc"] >= search["floor"]
    assert search["floor"] == search["baseline_val_acc"] - 100
    # pruned.pth is the chosen model, rebuilt in its pruned shape from its own description
    ckpt = load_checkpoint(os.path.join(pipeline, "pruned.pth"), "pruned")
    model = load_model(ckpt, "pruned.pth")
    assert ckpt["model"]["kwargs"].get("mids") == chosen["mids"] and ckpt["finished"] and ckpt["optimizer"] is None
    assert abs(weight_sparsity(model) - chosen["sparsity"]) < 1e-9
    sparse_steps = [c["sparsity"] for c in search["candidates"][2:4]]
    assert sparse_steps == sorted(sparse_steps) and sparse_steps[-1] > 0.5
    # the compact archive holds exactly int8.onnx, and is smaller
    restored = load_sparse_onnx(os.path.join(pipeline, "int8.sparse"))
    assert restored.SerializeToString() == onnx.load(os.path.join(pipeline, "int8.onnx")).SerializeToString()
    for name in ("sensitivity.png", "sensitivity.md", "pareto.png"):
        assert os.path.getsize(os.path.join(pipeline, name)) > 1000
    sens = json.load(open(os.path.join(pipeline, "sensitivity.json")))
    assert set(sens["int8"]) == set(sens["unstructured"]) and len(sens["structured"]) == 8  # the picked one's blocks


def test_seed_recipe_leaves_convolutions_float(pipeline):
    results = {r["stage"]: r for r in json.load(open(os.path.join(pipeline, "results.json")))["rows"]}
    assert results["seed_recipe"]["size_bytes"] > 0.9 * results["pruned"]["size_bytes"]
    assert results["int8"]["size_bytes"] < 0.4 * results["pruned"]["size_bytes"]  # fp16 would be about 0.5
    assert results["int8_sparse"]["size_bytes"] < results["int8"]["size_bytes"]
    assert results["int8_sparse"]["accuracy"] == results["int8"]["accuracy"]


def test_cifar_pickle_layout_is_read(tmp_path):
    from conftest import write_cifar_pickles
    data = load_dataset(write_cifar_pickles(tmp_path / "cifar"), False, str(tmp_path / "runs"))
    assert data["train"][0].shape == (200, 3, 32, 32) and data["train"][0].dtype == torch.uint8
    assert data["test"][0].shape == (40, 3, 32, 32) and len(data["train"][2]) == 4
    again = load_dataset(str(tmp_path / "cifar"), False, str(tmp_path / "runs"))  # from the cache
    assert torch.equal(again["train"][0], data["train"][0]) and torch.equal(again["test"][1], data["test"][1])


def test_the_scratch_control_is_the_students_architecture_trained_without_a_teacher(pipeline):
    search = json.load(open(os.path.join(pipeline, "search.json")))
    control = load_checkpoint(os.path.join(pipeline, "scratch.pth"), "scratch")
    student = load_checkpoint(os.path.join(pipeline, "student.pth"), "student")
    assert control["model"] == student["model"] and control["epochs"] == student["epochs"]
    assert "KD_ALPHA" in student["resume_key"] and "KD_ALPHA" not in control["resume_key"]
    assert search["scratch"]["kind"] == "control" and "scratch" not in [c["name"] for c in search["candidates"]]


def test_results_say_what_distillation_bought_against_the_control(pipeline):
    results = json.load(open(os.path.join(pipeline, "results.json")))
    rows = {r["stage"]: r for r in results["rows"]}
    gain = rows["int8"]["accuracy"] - rows["scratch"]["accuracy"]
    assert rows["int8"]["gain_over_scratch"] == pytest.approx(gain)
    lo, hi = rows["int8"]["gain_over_scratch_ci95"]
    assert lo <= gain <= hi
    assert "student against the scratch control" in open(os.path.join(pipeline, "results.md")).read()
