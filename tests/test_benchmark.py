"""benchmark.py and scripts/gpu_check.sh on tiny data, on the CPU: the GPU check's two stages (a lent GPU machine
gives one short try, so what can be proven here is proven here), a run stopped and resumed, and publishing."""
import json
import os
import subprocess
import sys
import tarfile

import onnx
import pytest
import torch

from conftest import COMPRESS_FLAGS, EVAL_FLAGS, TRAIN_FLAGS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tiny constants for every stage, on the CPU (the last value of a name wins, so these replace the stages' own):
# with them the smoke and the full stage run the same constants, so the smoke stage is also the uninterrupted
# run that a stopped and resumed full stage must match. The stride-2 baseline at half width in place of the GPU
# profile's CIFAR-stem one: the same code path, a sixteenth of the MACs.
# Two epochs at a learning rate that learns the tiny data in them: the smoke stage checks that the loss falls.
SHORT = ["--EPOCHS=2", "--KD_EPOCHS=2", "--LR=0.05", "--KD_LR=0.05", "--AGP_STEPS=1", "--FINAL_EPOCHS=0",
         "--STUDENTS=cifar:8-16-32-64:1", "--TRAIN_SUBSET=4000", "--ARCH=resnet_s2_w32"]
TINY = ["--DEVICE=cpu", "--REFERENCE_SECONDS=0.5"] + [f for f in TRAIN_FLAGS[:-1] + COMPRESS_FLAGS[:-1]
                                                       if not f.startswith("--AMP_DTYPE")] + EVAL_FLAGS + SHORT
# search.json entries that do not depend on timing or on the run's folder
SEARCH_KEYS = ("name", "widths", "mids", "float_val_acc", "val_acc", "drop_bound", "bytes", "onnx_bytes", "sparsity",
               "float_layers", "macs")


@pytest.fixture(scope="module")
def archive(imagefolder, tmp_path_factory):
    """The data archive as the README makes it (cifar10/ inside, xz-compressed)."""
    path = tmp_path_factory.mktemp("gpu_data") / "cifar10.tar.xz"
    with tarfile.open(path, "w:xz") as tar:
        tar.add(imagefolder, arcname="cifar10")
    return path


def gpu_check(stage, archive, work, out, extra=()):
    env = {**os.environ, "GPU_CHECK_ARCHIVE": str(archive), "GPU_CHECK_WORK": str(work), "OUT": str(out),
           "GPU_CHECK_FLAGS": " ".join(TINY + list(extra)), "PYTHON": sys.executable}  # this venv's, not PATH's
    proc = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), stage], env=env,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def smoke_run(archive, tmp_path_factory):
    """The smoke stage: (its work folder, its OUT folder, its output)."""
    work, out = tmp_path_factory.mktemp("smoke_work"), tmp_path_factory.mktemp("smoke_out")
    return work, out, gpu_check("smoke", archive, work, out).stdout


@pytest.fixture(scope="module")
def resumed_full_run(archive, tmp_path_factory):
    """The full stage stopped after train_baseline.py, then the same command again: (work folder, OUT folder,
    the first command's output, the second's)."""
    work, out = tmp_path_factory.mktemp("full_work"), tmp_path_factory.mktemp("full_out")
    first = gpu_check("full", archive, work, out, ["--STOP_AFTER=train_baseline.py"]).stdout
    stopped = (os.path.exists(work / "full" / "baseline.pth"), os.path.exists(work / "full" / "search.json"))
    assert stopped == (True, False), "the first command must end after the baseline"
    return work, out, first, gpu_check("full", archive, work, out).stdout


def test_the_smoke_stage_runs_all_three_scripts_and_says_what_it_ran_on(smoke_run):
    _, out, stdout = smoke_run
    log = open(out / "smoke" / "gpu_check.log").read()
    assert "benchmark: torch" in stdout and "onnxruntime" in stdout and "cudnn" in stdout
    assert "img/s" in log and "AMP_DTYPE" in log and "benchmark: evaluate_results.py took" in log
    assert json.load(open(out / "smoke" / "results.json"))["rows"]


def test_the_smoke_stage_shows_that_every_fresh_stage_learned(smoke_run):
    _, out, _ = smoke_run
    log = open(out / "smoke" / "gpu_check.log").read()
    checked = [line for line in log.splitlines() if line.startswith("learning check: ")]
    assert {line.split()[3] for line in checked} == {"baseline:", "student:", "scratch:"}, checked
    assert all(line.split()[2] == "ok" for line in checked), checked


def test_the_full_stage_runs_the_gpu_profile_and_leaves_its_files_in_out(resumed_full_run):
    work, out, _, _ = resumed_full_run
    bench = json.load(open(out / "full" / "benchmark.json"))
    config = json.load(open(out / "full" / "search.json"))["config"]
    assert (bench["profile"], config["PROFILE"], config["DEVICE"]) == ("gpu", "gpu", "cpu")
    assert bench["environment"]["device"] == "cpu" and bench["environment"]["torch-pruning"]
    assert (config["AMP_DTYPE"], config["TEACHER_VIEWS"]) == ("bfloat16", 0)
    assert set(bench["stage_speeds"]) == {"baseline", "student", "scratch", "struct1", "sparse1"}
    for name in ("gpu_check.log", "results.md", "training.png", "pareto.png"):
        assert os.path.getsize(out / "full" / name) > 0, name
    assert os.path.isfile(work / "data" / ".unpacked")


def model_files(folder):
    """The final files' content that a run's seeds decide: the pruned model's tensors and the INT8 graph's
    initializers (their metadata hold the run's id and paths)."""
    state = torch.load(folder / "pruned.pth", weights_only=True)["state_dict"]
    graph = onnx.load(str(folder / "int8.onnx")).graph
    return state, {t.name: t.raw_data for t in graph.initializer}


def test_a_stopped_full_stage_resumes_without_training_the_baseline_again(resumed_full_run):
    _, _, first, second = resumed_full_run
    assert "stopped after train_baseline.py" in first and "baseline   epoch" in first
    assert "resuming the run" in second and "baseline   epoch" not in second


def test_a_stopped_and_resumed_full_stage_ends_as_an_uninterrupted_run(resumed_full_run, smoke_run):
    resumed, uninterrupted = resumed_full_run[0] / "full", smoke_run[0] / "smoke"
    first, again = (json.load(open(d / "search.json")) for d in (uninterrupted, resumed))
    assert [[c[k] for k in SEARCH_KEYS] for c in first["candidates"]] == \
           [[c[k] for k in SEARCH_KEYS] for c in again["candidates"]]
    assert first["chosen"] == again["chosen"]
    (state_a, int8_a), (state_b, int8_b) = model_files(uninterrupted), model_files(resumed)
    assert state_a.keys() == state_b.keys() and all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert int8_a == int8_b


def test_a_finished_run_is_published_as_docs_results_md_with_its_files(resumed_full_run, tmp_path):
    run = resumed_full_run[0] / "full"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmark.py"), f"--OUT_DIR={run}",
                           f"--PUBLISH={tmp_path / 'docs'}"], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-2000:]
    page = open(tmp_path / "docs" / "results.md").read()
    table = open(run / "results.md").read().strip()
    search = json.load(open(run / "search.json"))
    assert table in page and "Reference workload" in page and "## Targets" in page
    assert all(f"| {c['name']}" in page for c in search["candidates"])
    for name in ("int8.onnx", "int8.sparse", "results.json", "search.json", "benchmark.json"):
        assert open(tmp_path / "docs" / "results" / name, "rb").read() == open(run / name, "rb").read()


def test_the_cpu_time_target_is_judged_at_a_reference_speed_of_1000_images_per_s():
    import benchmark
    time_target = benchmark.TARGETS["cpu"][0]
    # 90 minutes on a machine whose reference workload runs at 800 images/s is 72 at 1000: met; at 900, 81: missed
    for speed, met in ((800, True), (900, False)):
        timing = {"total_s_at_reference": benchmark.at_reference_speed(90 * 60, {"images_per_s": speed})}
        assert time_target.test({}, timing, {}) is met
    assert benchmark.at_reference_speed(90 * 60, None) == 90 * 60  # no reference measured: judged as it ran


def test_the_cpu_targets_judge_the_published_r17_figures():
    """Issue 36's targets on r17's own results.json: its baseline (86.48%) and shipped model (86.03%) miss 88.5%
    and 89.0%, its int8.sparse (0.162 MiB) and batch 64 (8.1x) meet 0.17 MiB and 7x; no target reads batch 1."""
    import benchmark
    results = json.load(open(os.path.join(ROOT, "docs", "results", "results.json")))
    rows = {r["stage"]: r for r in results["rows"]}
    untimed = [t for t in benchmark.TARGETS["cpu"] if not t.timed and t not in benchmark.COMMON_TARGETS]
    met = {t.description: t.test(rows, {}, results["search"]) for t in untimed}
    assert met == {"baseline test accuracy >= 88.5%": False, "shipped INT8 model test accuracy >= 89.0%": False,
                   "int8.sparse <= 0.17 MiB": True, "int8 >= 7x faster at batch 64, same runtime": True}
    for stage in ("int8", "int8_sparse"):
        rows[stage] = {**rows[stage], "accuracy": 89.0}
    shipped = next(t for t in untimed if t.description.startswith("shipped"))
    assert shipped.test(rows, {}, results["search"])
