"""The three scripts end to end on tiny data, and what their artifacts must satisfy."""
import json
import os
import warnings

import onnx
import pytest
import torch
from onnx import numpy_helper

from utils.checkpoint import load_checkpoint, load_model
from utils.prune import weight_sparsity
from utils.quantize import load_dynamic_quant
from utils.sparse import load_sparse_onnx
from utils.data import load_dataset
from utils.measure import ort_predict, ort_session
from utils.models import parse_arch
from utils.search import Entry, score

STAGES = ["baseline", "scratch", "student", "student_int8", "pruned", "int8", "int8_sparse", "dynamic_quant"]
REQUIRED = ["stage", "artifact", "runtime", "accuracy", "size_bytes", "params", "nonzero_params", "latency_b1_ms",
            "latency_b64_ms"]


def results(pipeline):
    return json.load(open(os.path.join(pipeline, "results.json")))


def search_log(pipeline):
    return json.load(open(os.path.join(pipeline, "search.json")))


def test_results_have_a_measured_row_per_stage_sized_from_its_file(pipeline):
    rows = results(pipeline)["rows"]
    assert [r["stage"] for r in rows] == STAGES
    assert all(all(k in row for k in REQUIRED) for row in rows)
    assert all(row["size_bytes"] == os.path.getsize(row["artifact"]) for row in rows)


def test_every_accuracy_and_drop_lies_inside_its_interval(pipeline):
    for row in results(pipeline)["rows"]:
        lo, hi = row["accuracy_ci95"]
        assert lo <= row["accuracy"] <= hi and hi - lo > 4  # 80 test images: wide, even at 100% (95.4-100)
        lo, hi = row["accuracy_drop_ci95"]
        assert lo <= row["accuracy_drop"] <= hi


def test_results_record_the_machine_and_config_they_were_measured_with(pipeline):
    res = results(pipeline)
    assert res["machine"]["threads"] == 2 and res["machine"]["onnxruntime"] and res["config"]["RUNS_B1"] == 100


def test_results_md_has_a_row_per_stage(pipeline):
    table = open(os.path.join(pipeline, "results.md")).read()
    assert all(f"| {stage}" in table for stage in STAGES) and "paired drop 95%" in table


def test_the_baseline_learns_the_synthetic_classes(pipeline):
    assert results(pipeline)["rows"][0]["accuracy"] > 50


def initializer_bytes(path):
    return sum(numpy_helper.to_array(t).nbytes for t in onnx.load(path).graph.initializer)


def test_int8_onnx_holds_its_weights_in_about_a_quarter_of_the_float_exports_bytes(pipeline):
    pruned = next(row for row in results(pipeline)["rows"] if row["stage"] == "pruned")
    # int8 weights: a quarter of float32's bytes, plus per-channel scales and int32 biases; fp16 weights (half) fail
    # this. The weights, not the files: a tiny model's file is mostly graph and metadata.
    ratio = initializer_bytes(pruned["onnx_artifact"]) / initializer_bytes(os.path.join(pipeline, "int8.onnx"))
    assert ratio >= 3.0


def test_evaluate_times_the_float_exports_the_search_made_of_the_same_weights(pipeline):
    exports = {row["stage"]: row["onnx_artifact"] for row in results(pipeline)["rows"] if row["onnx_artifact"]}
    assert set(exports) == {"baseline", "scratch", "student", "pruned"}
    assert all(os.path.dirname(path) == os.path.join(pipeline, "search") for path in exports.values()), exports
    assert not os.path.exists(os.path.join(pipeline, "onnx"))


def test_every_conv_of_int8_onnx_reads_an_int8_weight(pipeline):
    graph = onnx.load(os.path.join(pipeline, "int8.onnx")).graph
    int8_inits = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.INT8}
    dq_out = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert convs and all(dq_out.get(n.input[1]) in int8_inits for n in convs)


def test_int8_onnx_runs_alone_and_agrees_with_the_float_model(pipeline, imagefolder):
    test_x = load_dataset(imagefolder, False, pipeline)["test"][0].float() / 255
    pruned = load_model(load_checkpoint(os.path.join(pipeline, "pruned.pth"), "pruned"), "pruned.pth")
    with torch.no_grad():
        float_pred = pruned(test_x).argmax(1)
    int8_pred = ort_predict(ort_session(os.path.join(pipeline, "int8.onnx"), 2))(test_x).argmax(1)
    assert (float_pred == int8_pred).float().mean() >= 0.9


STUDENTS = ["student_stride2_24-48-96-192_2", "student_cifar_16-32-64-128_2"]


def test_the_search_walks_every_step_when_nothing_breaks_the_budget(pipeline):
    names = [c["name"] for c in search_log(pipeline)["candidates"]]
    # a budget of 100 points: both students, every structured and AGP step, the recovery of the first choice
    assert names[:4] == STUDENTS + ["struct1", "sparse1"]
    assert len(names) == 5 and names[4].endswith("_ft")


def test_the_search_walks_from_the_student_best_by_the_objective(pipeline):
    search = search_log(pipeline)
    picked = min(search["candidates"][:2], key=lambda c: score(Entry(**c), search["objective"]))
    student_ckpt = load_checkpoint(os.path.join(pipeline, "student.pth"), "student")
    assert search["student"] == picked["arch"]
    assert student_ckpt["model"]["kwargs"]["stem"] == parse_arch(picked["arch"])["stem"]


def test_sparse_candidates_share_the_latency_of_their_structured_parent(pipeline):
    # same shape, same dense kernels: timed once
    assert [c["latency_measured_on"] for c in search_log(pipeline)["candidates"]] == STUDENTS + ["struct1"] * 3


def test_pruned_pth_is_the_chosen_model_rebuilt_in_its_pruned_shape(pipeline):
    search = search_log(pipeline)
    chosen = next(c for c in search["candidates"] if c["name"] == search["chosen"])
    ckpt = load_checkpoint(os.path.join(pipeline, "pruned.pth"), "pruned")
    model = load_model(ckpt, "pruned.pth")
    assert ckpt["model"]["kwargs"].get("mids") == chosen["mids"] and ckpt["finished"] and ckpt["optimizer"] is None
    assert abs(weight_sparsity(model) - chosen["sparsity"]) < 1e-9


def test_agp_sparsity_grows_with_each_step(pipeline):
    sparse_steps = [c["sparsity"] for c in search_log(pipeline)["candidates"][2:4]]
    assert sparse_steps == sorted(sparse_steps) and sparse_steps[-1] > 0.5


def test_int8_sparse_holds_exactly_int8_onnx(pipeline):
    restored = load_sparse_onnx(os.path.join(pipeline, "int8.sparse"))
    assert restored.SerializeToString() == onnx.load(os.path.join(pipeline, "int8.onnx")).SerializeToString()


def test_the_sensitivity_analysis_covers_the_picked_students_layers(pipeline):
    for name in ("sensitivity.png", "sensitivity.md", "pareto.png"):
        assert os.path.getsize(os.path.join(pipeline, name)) > 1000
    sens = json.load(open(os.path.join(pipeline, "sensitivity.json")))
    assert set(sens["int8"]) == set(sens["unstructured"])
    # the picked student's channel groups: its 4 residual streams and the insides of its 8 blocks
    assert len(sens["structured"]) == 4 + 8 and {"layer1", "layer4", "layer4.1"} <= set(sens["structured"])


def rows_by_stage(pipeline):
    return {r["stage"]: r for r in results(pipeline)["rows"]}


def test_dynamic_quantization_leaves_convolutions_float(pipeline):
    rows = rows_by_stage(pipeline)
    assert rows["dynamic_quant"]["size_bytes"] > 0.9 * rows["pruned"]["size_bytes"]


def test_dynamic_quant_pth_loads_without_torchs_deprecation_warnings(pipeline):
    """evaluate_results.py loads it amid the results it prints: torch's warnings about quantized storages stay out."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, _ = load_dynamic_quant(os.path.join(pipeline, "dynamic_quant.pth"))
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 4)


def test_int8_stores_the_weights_in_about_a_byte_each(pipeline):
    # the weights' own bytes (the file also holds the graph, whose size depends on the checkout's path)
    graph = onnx.load(os.path.join(pipeline, "int8.onnx")).graph
    stored = sum(numpy_helper.to_array(t).nbytes for t in graph.initializer)
    assert stored < 0.35 * 4 * rows_by_stage(pipeline)["pruned"]["params"]  # float16 would be 0.5


def test_int8_sparse_is_smaller_than_int8_and_as_accurate(pipeline):
    rows = rows_by_stage(pipeline)
    assert rows["int8_sparse"]["size_bytes"] < rows["int8"]["size_bytes"]
    assert rows["int8_sparse"]["accuracy"] == rows["int8"]["accuracy"]


def test_cifar_pickle_layout_is_read(tmp_path):
    from conftest import write_cifar_pickles
    data = load_dataset(write_cifar_pickles(tmp_path / "cifar"), False, str(tmp_path / "runs"))
    assert data["train"][0].shape == (200, 3, 32, 32) and data["train"][0].dtype == torch.uint8
    assert data["test"][0].shape == (40, 3, 32, 32) and len(data["train"][2]) == 4
    again = load_dataset(str(tmp_path / "cifar"), False, str(tmp_path / "runs"))  # from the cache
    assert torch.equal(again["train"][0], data["train"][0]) and torch.equal(again["test"][1], data["test"][1])


def test_the_scratch_control_is_the_students_architecture_trained_without_a_teacher(pipeline):
    search = search_log(pipeline)
    control = load_checkpoint(os.path.join(pipeline, "scratch.pth"), "scratch")
    student = load_checkpoint(os.path.join(pipeline, "student.pth"), "student")
    assert control["model"] == student["model"] and control["epochs"] == student["epochs"]
    assert "KD_ALPHA" in student["resume_key"] and "KD_ALPHA" not in control["resume_key"]
    assert search["scratch"]["kind"] == "control" and "scratch" not in [c["name"] for c in search["candidates"]]


def test_results_say_what_distillation_bought_against_the_control(pipeline):
    rows = rows_by_stage(pipeline)
    gain = rows["int8"]["accuracy"] - rows["scratch"]["accuracy"]
    assert rows["int8"]["gain_over_scratch"] == pytest.approx(gain)
    lo, hi = rows["int8"]["gain_over_scratch_ci95"]
    assert lo <= gain <= hi
    assert "student against the scratch control" in open(os.path.join(pipeline, "results.md")).read()


def test_results_compare_the_shipped_int8_model_with_the_students_int8_model(pipeline):
    res, log = results(pipeline), search_log(pipeline)
    rows = {r["stage"]: r for r in res["rows"]}
    student = next(c for c in log["candidates"] if c["kind"] == "student")
    chosen = next(c for c in log["candidates"] if c["name"] == log["chosen"])
    assert res["against_student"] == {
        "speedup_b1": pytest.approx(rows["student_int8"]["latency_b1_ms"] / rows["int8"]["latency_b1_ms"]),
        "speedup_b64": pytest.approx(rows["student_int8"]["latency_b64_ms"] / rows["int8"]["latency_b64_ms"]),
        "mac_ratio": pytest.approx(student["macs"] / chosen["macs"])}
