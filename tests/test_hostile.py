"""What a hostile or unlucky user does, case by case (the numbering follows the hostile-input issue): nothing is
lost or mixed, nothing from the data folder runs, no small file exhausts memory, no silent wrong result, one
line for every mistake, no leftovers, and the same seeds give the same search."""
import errno
import glob
import json
import lzma
import os
import pickle
import shutil
import subprocess
import sys
import tracemalloc
from types import SimpleNamespace

import pytest
import torch

import compress_model
import evaluate_results
import train_baseline
from conftest import (COMPRESS_FLAGS, EVAL_FLAGS, TRAIN_FLAGS, assert_one_line_error, cli, no_temp_files, tiny_data,
                      small_model, write_cifar_pickles)
from utils.data import Split, load_dataset
from utils.files import LOCK_NAME, atomic_path, out_dir_lock, pid_alive
from utils.quantize import Quantization
from utils.sparse import MAGIC, SparseFormatError, _chunk, read_sparse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN_FILES = ["pruned.pth", "int8.onnx", "int8.sparse", "dynamic_quant.pth", "search.json"]


def copy_run(pipeline, tmp_path):
    out = tmp_path / "runs"
    shutil.copytree(pipeline, out)
    return out


def file_bytes(folder, names):
    return {name: (folder / name).read_bytes() for name in names}


def dead_pid():
    """A process id that no process has now."""
    pid = 999_999
    while pid_alive(pid):
        pid -= 1
    return pid


# 1. Data loss and mixed artifacts ----------------------------------------------------------------------------

def test_disk_full_while_writing_the_final_files_leaves_the_previous_run_whole(pipeline, imagefolder, tmp_path,
                                                                               capsys, monkeypatch):
    out = copy_run(pipeline, tmp_path)
    before = file_bytes(out, RUN_FILES)

    def copy_then_disk_full(src, dst):
        with open(src, "rb") as f, open(dst, "wb") as g:
            g.write(f.read(100_000))
        raise OSError(errno.ENOSPC, "No space left on device", dst)
    monkeypatch.setattr(compress_model.shutil, "copyfile", copy_then_disk_full)
    code, _, err = cli(compress_model.main, [f"--DATA_DIR={imagefolder}", f"--OUT_DIR={out}"] + COMPRESS_FLAGS,
                       capsys, monkeypatch)
    assert_one_line_error(code, err, "No space left on device")
    assert file_bytes(out, RUN_FILES) == before, "the previous run's files must stay exactly as they were"
    assert no_temp_files(out) and not [d for d in os.listdir(out) if d.startswith(".staging")]
    assert not (out / LOCK_NAME).exists()


def test_a_second_run_on_the_same_out_dir_stops_naming_the_first(imagefolder, tmp_path):
    out = tmp_path / "runs"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); from utils.files import out_dir_lock\n"
         "with out_dir_lock(sys.argv[2], 'compress_model.py'):\n    print('locked', flush=True); sys.stdin.read()",
         ROOT, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run([sys.executable, os.path.join(ROOT, "compress_model.py"), f"--OUT_DIR={out}",
                                 f"--DATA_DIR={imagefolder}"] + COMPRESS_FLAGS, capture_output=True, text=True,
                                stdin=subprocess.DEVNULL)
    finally:
        holder.communicate("")
    assert second.returncode == 2 and second.stderr.strip().splitlines() == [
        f"error: {out} is in use by compress_model.py (pid {holder.pid}); wait for it to finish, or use another "
        f"OUT_DIR"], second.stderr
    assert not (out / LOCK_NAME).exists()
    # a lock left by a process that was killed is taken over
    (out / LOCK_NAME).write_text(f"{dead_pid()} compress_model.py\n")
    with out_dir_lock(str(out), "test"):
        assert (out / LOCK_NAME).read_text().startswith(f"{os.getpid()} ")


def test_evaluate_refuses_artifacts_of_different_runs(pipeline, imagefolder, tmp_path, capsys, monkeypatch):
    out = copy_run(pipeline, tmp_path)
    ckpt = torch.load(out / "pruned.pth", weights_only=True)
    ckpt["run_id"] = "20000101-000000-other"
    torch.save(ckpt, out / "pruned.pth")
    code, stdout, err = cli(evaluate_results.main, [f"--DATA_DIR={imagefolder}", f"--OUT_DIR={out}"] + EVAL_FLAGS,
                            capsys, monkeypatch)
    assert_one_line_error(code, err, "different runs", "pruned.pth (run 20000101-000000-other)")
    assert "measured" not in stdout
    # a baseline retrained after the compression: its row would not belong to this run either
    shutil.copy(os.path.join(pipeline, "pruned.pth"), out / "pruned.pth")
    ckpt = torch.load(out / "baseline.pth", weights_only=True)
    ckpt["history"].append({"epoch": 99, "val_accuracy": 0.0})
    torch.save(ckpt, out / "baseline.pth")
    code, _, err = cli(evaluate_results.main, [f"--DATA_DIR={imagefolder}", f"--OUT_DIR={out}"] + EVAL_FLAGS,
                       capsys, monkeypatch)
    assert_one_line_error(code, err, "baseline.pth changed after compress_model.py")


# 2. Code from the data folder ---------------------------------------------------------------------------------

class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused(tmp_path, capsys, monkeypatch):
    data = write_cifar_pickles(tmp_path / "cifar")
    marker = tmp_path / "pwned"
    with open(os.path.join(data, "cifar-10-batches-py", "batches.meta"), "wb") as f:
        pickle.dump({"label_names": ["a", "b", "c", "d"], "x": RunsACommand(marker)}, f)
    code, _, err = cli(train_baseline.main, [f"--DATA_DIR={data}", f"--OUT_DIR={tmp_path / 'runs'}"] + TRAIN_FLAGS,
                       capsys, monkeypatch)
    assert_one_line_error(code, err, "refused to load", "system")
    assert not marker.exists(), "the payload ran"


# 3. Memory exhaustion from a small file -----------------------------------------------------------------------

def lzma_file(path, payload):
    path.write_bytes(lzma.compress(payload, preset=1))
    return str(path)


def test_crafted_archives_are_refused_before_any_large_allocation(tmp_path):
    bomb = lzma_file(tmp_path / "bomb.sparse", MAGIC + b"\0" * 60_000_000)  # 60 MB from about 9 KB
    claims = lzma_file(tmp_path / "claims.sparse", MAGIC + _chunk(json.dumps(
        {"tensors": [{"name": "w", "size": 10**12, "nonzero": 10**12}]}).encode()) + _chunk(b""))
    huge_chunk = lzma_file(tmp_path / "chunk.sparse", MAGIC + (2**62).to_bytes(8, "little") + b"{}")
    tracemalloc.start()
    try:
        for path, words in ((bomb, "expands past"), (claims, "does not have"), (huge_chunk, "truncated")):
            with pytest.raises(SparseFormatError, match=words):
                read_sparse(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert os.path.getsize(bomb) < 20_000 and peak < 20 * 2**20, f"peak {peak / 2**20:.1f} MiB"


# 4. Silent wrong results --------------------------------------------------------------------------------------

def test_an_unfinished_baseline_is_refused(pipeline, imagefolder, tmp_path, capsys, monkeypatch):
    (tmp_path / "runs").mkdir()
    ckpt = torch.load(os.path.join(pipeline, "baseline.pth"), weights_only=True)
    ckpt.update(finished=False, epoch=1)
    torch.save(ckpt, tmp_path / "runs" / "baseline.pth")
    code, _, err = cli(compress_model.main, [f"--DATA_DIR={imagefolder}", f"--OUT_DIR={tmp_path / 'runs'}"]
                       + COMPRESS_FLAGS, capsys, monkeypatch)
    assert_one_line_error(code, err, "unfinished (epoch 1 of 3)", "train_baseline.py")


@pytest.mark.parametrize("change", ["fewer classes", "renamed class"])
def test_a_baseline_of_other_classes_is_refused(pipeline, imagefolder, tmp_path, capsys, monkeypatch, change):
    data = tmp_path / "data"
    shutil.copytree(imagefolder, data)
    for split in ("train", "test"):
        if change == "fewer classes":
            shutil.rmtree(data / split / "grey")
        else:
            os.rename(data / split / "grey", data / split / "gray")
    (tmp_path / "runs").mkdir()
    shutil.copy(os.path.join(pipeline, "baseline.pth"), tmp_path / "runs")
    code, _, err = cli(compress_model.main, [f"--DATA_DIR={data}", f"--OUT_DIR={tmp_path / 'runs'}"] + COMPRESS_FLAGS,
                       capsys, monkeypatch)
    assert_one_line_error(code, err, "was trained on the classes", "'grey'")


def test_the_image_cache_sees_added_and_relabelled_images(imagefolder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(imagefolder, data)
    first = load_dataset(str(data), False, str(tmp_path / "runs"))
    shutil.copy(data / "train" / "red" / "0000.png", data / "train" / "red" / "extra.png")
    added = load_dataset(str(data), False, str(tmp_path / "runs"))
    assert len(added["train"].x) == len(first["train"].x) + 1
    os.rename(data / "train" / "red" / "extra.png", data / "train" / "blue" / "extra.png")
    moved = load_dataset(str(data), False, str(tmp_path / "runs"))
    assert (moved["train"].y == moved["train"].classes.index("blue")).sum() == \
        (first["train"].y == first["train"].classes.index("blue")).sum() + 1


# 5. One line, not a traceback ---------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [b"this is text, not an image", "truncated"])
def test_an_unreadable_image_is_one_line_naming_it(imagefolder, tmp_path, capsys, monkeypatch, content):
    data = tmp_path / "data"
    shutil.copytree(imagefolder, data)
    bad = data / "train" / "red" / "bad.jpg"
    if content == "truncated":
        from PIL import Image
        Image.new("RGB", (32, 32), (200, 10, 10)).save(bad, quality=90)
        bad.write_bytes(bad.read_bytes()[:200])
    else:
        bad.write_bytes(content)
    code, _, err = cli(train_baseline.main, [f"--DATA_DIR={data}", f"--OUT_DIR={tmp_path / 'runs'}"] + TRAIN_FLAGS,
                       capsys, monkeypatch)
    assert_one_line_error(code, err, "cannot read image", str(bad))


@pytest.mark.parametrize("failure", [(errno.ENOSPC, "No space left on device"), (errno.EROFS, "Read-only file system"),
                                     (errno.EACCES, "Permission denied")])
def test_a_full_or_read_only_disk_is_one_line_naming_the_file_and_leaves_no_temp_file(imagefolder, tmp_path, capsys,
                                                                                      monkeypatch, failure):
    real_save = torch.save

    def failing_write(obj, path, *args, **kwargs):
        if str(path).endswith(".pth") or ".pth.tmp" in str(path):
            with open(path, "wb") as f:
                f.write(b"half")
            raise OSError(*failure, str(path))
        return real_save(obj, path, *args, **kwargs)
    monkeypatch.setattr(torch, "save", failing_write)
    out = tmp_path / "runs"
    code, _, err = cli(train_baseline.main, [f"--DATA_DIR={imagefolder}", f"--OUT_DIR={out}"] + TRAIN_FLAGS,
                       capsys, monkeypatch)
    assert_one_line_error(code, err, "baseline.pth.tmp", failure[1])
    assert no_temp_files(out) and not (out / "baseline.pth").exists() and not (out / LOCK_NAME).exists()


@pytest.mark.parametrize("script", [train_baseline, compress_model, evaluate_results])
def test_out_dir_naming_a_file_or_inside_one_is_one_line(script, tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    code, _, err = cli(script.main, [f"--OUT_DIR={tmp_path / 'file'}", f"--DATA_DIR={tmp_path}"], capsys, monkeypatch)
    assert_one_line_error(code, err, "is a file, not a folder")
    code, _, err = cli(script.main, [f"--OUT_DIR={tmp_path / 'file' / 'sub'}", f"--DATA_DIR={tmp_path}"], capsys,
                       monkeypatch)
    assert_one_line_error(code, err, str(tmp_path / "file"), "Not a directory")


def test_a_truncated_int8_onnx_is_one_line_before_any_measuring(pipeline, imagefolder, tmp_path, capsys,
                                                                monkeypatch):
    out = copy_run(pipeline, tmp_path)
    data = (out / "int8.onnx").read_bytes()
    (out / "int8.onnx").write_bytes(data[:len(data) // 3])
    code, stdout, err = cli(evaluate_results.main, [f"--DATA_DIR={imagefolder}", f"--OUT_DIR={out}"] + EVAL_FLAGS,
                            capsys, monkeypatch)
    assert_one_line_error(code, err, "int8.onnx is not a readable ONNX model")
    assert "measured" not in stdout


@pytest.mark.parametrize("header, model", [
    (b"not json", b""),
    (b'{"tensors": "nope"}', b""),
    (b'{"tensors": [{"name": 3, "size": "x"}]}', b""),
    (b'{"tensors": []}', b"\xff\xff\xff not a protobuf"),
])
def test_a_sparse_archive_with_bad_content_is_one_line(pipeline, imagefolder, tmp_path, capsys, monkeypatch, header,
                                                        model):
    out = copy_run(pipeline, tmp_path)
    lzma_file(out / "int8.sparse", MAGIC + _chunk(header) + _chunk(model))
    code, _, err = cli(evaluate_results.main, [f"--DATA_DIR={imagefolder}", f"--OUT_DIR={out}"] + EVAL_FLAGS,
                       capsys, monkeypatch)
    assert_one_line_error(code, err, "int8.sparse is not a compact sparse model")


def test_a_truncated_sensitivity_json_is_measured_again(tmp_path, capsys):
    cfg = SimpleNamespace(OUT_DIR=str(tmp_path), SENS_IMAGES=16, CALIB_IMAGES=16, DEVICE="cpu")
    ctx = SimpleNamespace(val=Split(*tiny_data(16), ["a", "b", "c", "d"]), work_dir=str(tmp_path / "search"),
                          quant=Quantization(tiny_data(16)[0].float() / 255))
    first = compress_model.sensitivities(SimpleNamespace(name="student", model=small_model()), ctx, cfg)
    text = (tmp_path / "sensitivity.json").read_text()
    (tmp_path / "sensitivity.json").write_text(text[:len(text) // 2])
    again = compress_model.sensitivities(SimpleNamespace(name="student", model=small_model()), ctx, cfg)
    assert "unreadable, computing it again" in capsys.readouterr().out and again == first


# 6. Leftovers -------------------------------------------------------------------------------------------------

def test_leftovers_of_a_killed_run_are_removed_at_the_next_start(tmp_path, capsys):
    pid = dead_pid()
    (tmp_path / "search").mkdir()
    stale = [tmp_path / f"baseline.pth.tmp{pid}", tmp_path / "search" / f"baseline_fp32.onnx.tmp{pid}.onnx"]
    for path in stale:
        path.write_bytes(b"\0" * 1000)
    (tmp_path / f".staging.tmp{pid}").mkdir()
    live = tmp_path / f"other.pth.tmp{os.getppid()}"  # a running process's temporary file stays
    live.write_bytes(b"x")
    with out_dir_lock(str(tmp_path), "test"):
        pass
    assert not any(p.exists() for p in stale) and not (tmp_path / f".staging.tmp{pid}").exists()
    assert live.exists() and "left by an interrupted run" in capsys.readouterr().out


def test_a_failed_write_keeps_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "pareto.png"
    target.write_bytes(b"old figure")
    with pytest.raises(RuntimeError):
        with atomic_path(str(target)) as tmp:
            open(tmp, "wb").write(b"half a new fig")
            raise RuntimeError("matplotlib failed")
    assert target.read_bytes() == b"old figure" and os.listdir(tmp_path) == ["pareto.png"]


def test_a_flag_without_its_value_is_refused(tmp_path, capsys, monkeypatch):
    code, _, err = cli(train_baseline.main, ["--DATA_DIR", "--EPOCHS=1", f"--OUT_DIR={tmp_path}"], capsys, monkeypatch)
    assert_one_line_error(code, err, "--DATA_DIR needs a value")


# 7. The same seeds, the same search ---------------------------------------------------------------------------

def test_the_same_seeds_give_the_same_search_in_a_second_run(pipeline, imagefolder, tmp_path, capsys, monkeypatch):
    """The pipeline fixture's search, made after other tests ran in this process, made again from the same baseline
    in a fresh folder: the same candidates, widths, accuracies and choice. The first run's float ONNX exports are
    there too: an export is reused only for the same spec and bit-identical weights (utils.quantize.export_key), so
    the second run trains, prunes, quantizes and measures everything again and exports only what differs (the
    exporter's own determinism: test_benchmark.py, whose two runs export everything)."""
    out = tmp_path / "runs"
    out.mkdir()
    shutil.copy(os.path.join(pipeline, "baseline.pth"), out)
    os.mkdir(out / "search")
    for name in glob.glob(os.path.join(pipeline, "search", "*_fp32.onnx")):
        shutil.copy(name, out / "search")
    assert torch.get_num_threads() == 2, "an earlier test or helper changed the thread count (it changes sums)"
    code, _, err = cli(compress_model.main, [f"--DATA_DIR={imagefolder}", f"--OUT_DIR={out}"] + COMPRESS_FLAGS,
                       capsys, monkeypatch)
    assert code == 0, err
    keys = ("name", "widths", "mids", "float_val_acc", "val_acc", "drop_bound", "bytes", "onnx_bytes", "sparsity",
            "float_layers")
    first, second = (json.load(open(os.path.join(d, "search.json"))) for d in (pipeline, out))
    assert [[c[k] for k in keys] for c in first["candidates"]] == [[c[k] for k in keys] for c in second["candidates"]]
    assert first["chosen"] == second["chosen"]
