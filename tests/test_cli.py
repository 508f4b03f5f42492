"""Resume after an interruption, and every bad input: one line on stderr, exit status 2, nothing half-written."""
import os
import shutil

import pytest
import torch

import compress_model
import evaluate_results
import train_baseline
import utils.train
from conftest import COMPRESS_FLAGS, TRAIN_FLAGS, assert_one_line_error, cli, no_temp_files


def test_train_resumes_from_the_last_finished_epoch(imagefolder, tmp_path, capsys, monkeypatch):
    common = [f"--DATA_DIR={imagefolder}", f"--OUT_DIR={tmp_path / 'a'}"] + TRAIN_FLAGS
    calls = {"n": 0}
    real = utils.train.train_one_epoch

    def interrupted_in_third_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(utils.train, "train_one_epoch", interrupted_in_third_epoch)
    code, _, err = cli(train_baseline.main, common, capsys, monkeypatch)
    assert code == 130 and "rerun" in err
    ckpt = torch.load(tmp_path / "a" / "baseline.pth", weights_only=True)
    assert ckpt["epoch"] == 2 and not ckpt["finished"] and ckpt["optimizer"] is not None
    monkeypatch.setattr(utils.train, "train_one_epoch", real)
    code, out, _ = cli(train_baseline.main, common, capsys, monkeypatch)
    assert code == 0 and "resuming" in out and "after epoch 2/3" in out
    resumed = torch.load(tmp_path / "a" / "baseline.pth", weights_only=True)
    assert resumed["finished"] and resumed["epoch"] == 3 and len(resumed["history"]) == 3
    # the same run without interruption ends with the same weights
    straight = [f"--DATA_DIR={imagefolder}", f"--OUT_DIR={tmp_path / 'b'}"] + TRAIN_FLAGS
    assert cli(train_baseline.main, straight, capsys, monkeypatch)[0] == 0
    other = torch.load(tmp_path / "b" / "baseline.pth", weights_only=True)
    for key, value in resumed["state_dict"].items():
        assert torch.allclose(value.float(), other["state_dict"][key].float(), atol=1e-4), key
    assert no_temp_files(tmp_path)


def test_compress_without_baseline_names_the_script_to_run(imagefolder, tmp_path, capsys, monkeypatch):
    code, _, err = cli(compress_model.main, [f"--DATA_DIR={imagefolder}", f"--OUT_DIR={tmp_path}"], capsys,
                       monkeypatch)
    assert_one_line_error(code, err, "no baseline checkpoint", "train_baseline.py")
    assert os.listdir(tmp_path) == []


def test_evaluate_without_artifacts_names_the_script_to_run(imagefolder, tmp_path, capsys, monkeypatch):
    code, _, err = cli(evaluate_results.main, [f"--DATA_DIR={imagefolder}", f"--OUT_DIR={tmp_path}"], capsys,
                       monkeypatch)
    assert_one_line_error(code, err, "train_baseline.py")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_or_truncated_checkpoint(pipeline, imagefolder, tmp_path, capsys, monkeypatch, damage):
    path = tmp_path / "baseline.pth"
    if damage == "garbage":
        path.write_bytes(b"not a checkpoint at all" * 100)
    else:
        data = open(os.path.join(pipeline, "baseline.pth"), "rb").read()
        path.write_bytes(data[: len(data) // 2])
    before = sorted(os.listdir(tmp_path))
    code, _, err = cli(compress_model.main, [f"--DATA_DIR={imagefolder}", f"--OUT_DIR={tmp_path}"] + COMPRESS_FLAGS,
                       capsys, monkeypatch)
    assert_one_line_error(code, err, "baseline.pth", "corrupt or truncated")
    assert sorted(os.listdir(tmp_path)) == before


def test_checkpoint_of_another_architecture(pipeline, imagefolder, tmp_path, capsys, monkeypatch):
    # a baseline made with resnet_s2_w32 (TRAIN_FLAGS), resumed with ARCH=resnet18_cifar
    shutil.copy(os.path.join(pipeline, "baseline.pth"), tmp_path / "baseline.pth")
    argv = [f"--DATA_DIR={imagefolder}", f"--OUT_DIR={tmp_path}"] + TRAIN_FLAGS + ["--ARCH=resnet18_cifar"]
    code, _, err = cli(train_baseline.main, argv, capsys, monkeypatch)
    assert_one_line_error(code, err, "baseline.pth", "stem=stride2", "stem=cifar")
    # a student checkpoint where the baseline should be
    shutil.copy(os.path.join(pipeline, "student.pth"), tmp_path / "baseline.pth")
    code, _, err = cli(compress_model.main, [f"--DATA_DIR={imagefolder}", f"--OUT_DIR={tmp_path}"], capsys,
                       monkeypatch)
    assert_one_line_error(code, err, "'student'", "expected 'baseline'")
    assert no_temp_files(tmp_path)


def test_missing_and_empty_data_folders(tmp_path, capsys, monkeypatch):
    out = f"--OUT_DIR={tmp_path / 'runs'}"
    code, _, err = cli(train_baseline.main, [f"--DATA_DIR={tmp_path / 'nowhere'}", "--DOWNLOAD=False", out], capsys,
                       monkeypatch)
    assert_one_line_error(code, err, "does not exist")
    (tmp_path / "empty").mkdir()
    code, _, err = cli(train_baseline.main, [f"--DATA_DIR={tmp_path / 'empty'}", "--DOWNLOAD=False", out], capsys,
                       monkeypatch)
    assert_one_line_error(code, err, "holds neither")
    (tmp_path / "hollow" / "train" / "cat").mkdir(parents=True)
    (tmp_path / "hollow" / "test" / "cat").mkdir(parents=True)
    code, _, err = cli(train_baseline.main, [f"--DATA_DIR={tmp_path / 'hollow'}", out], capsys, monkeypatch)
    assert_one_line_error(code, err, "no images found")
    assert not (tmp_path / "runs").exists() or no_temp_files(tmp_path / "runs")


def test_a_failed_download_names_the_full_path_and_leaves_no_empty_folders(tmp_path, capsys, monkeypatch):
    """Offline with DOWNLOAD=True (the default) and a DATA_DIR that is not there, e.g. a relative path run from
    another folder: one line with the absolute path, and the folders the attempt made are gone again."""
    import torchvision.datasets

    class Offline:
        def __init__(self, root, train, download):
            os.makedirs(os.path.join(root, "cifar-10-batches-py"))
            raise OSError("Name or service not known")
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", Offline)
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(train_baseline.main, ["--DATA_DIR=shared/data/cifar10", "--OUT_DIR=runs"], capsys, monkeypatch)
    assert_one_line_error(code, err, "could not download CIFAR-10", str(tmp_path / "shared" / "data" / "cifar10"),
                          "Name or service not known")
    assert not (tmp_path / "shared").exists()


@pytest.mark.parametrize("script, argv, words", [
    (train_baseline, ["--EPOCS=3"], ["unknown constant --EPOCS"]),
    (train_baseline, ["--EPOCHS=three"], ["--EPOCHS expects int"]),
    (train_baseline, ["--ARCH=vgg16"], ["--ARCH must be one of"]),
    (train_baseline, ["--LABEL_SMOOTHING=1.5"], ["--LABEL_SMOOTHING must be in"]),
    (compress_model, ["--SPARSITY=1.0"], ["--SPARSITY must be in"]),
    (compress_model, ["--OBJECTIVE=smallest"], ["--OBJECTIVE must be one of", "size", "latency", "balanced"]),
    (compress_model, ["--MAX_ACC_DROP=-1"], ["--MAX_ACC_DROP must be in"]),
    (compress_model, ["--KD_ALPHA=-0.1"], ["--KD_ALPHA must be in"]),
    (compress_model, ["--CALIB_METHOD=magic"], ["--CALIB_METHOD must be one of"]),
    (compress_model, ["--STUDENTS=resnet99"], ["--STUDENTS", "'resnet99'", "stem:widths:blocks"]),
    (compress_model, ["--STUDENTS=cifar:16-32:0"], ["--STUDENTS", "'cifar:16-32:0'"]),
    (compress_model, ["--STUDENTS=resnet20,resnet20"], ["--STUDENTS names a student twice"]),
    (evaluate_results, ["--RUNS_B1=10"], ["--RUNS_B1 must be in"]),
    (evaluate_results, ["--PROFILE=tpu"], ["--PROFILE must be one of"]),
    (evaluate_results, ["--DEVCE=cpu"], ["unknown constant --DEVCE"]),
])
def test_bad_constants(script, argv, words, tmp_path, capsys, monkeypatch):
    code, _, err = cli(script.main, argv + [f"--OUT_DIR={tmp_path}"], capsys, monkeypatch)
    assert_one_line_error(code, err, *words)
    assert os.listdir(tmp_path) == []


def test_rerunning_compress_reuses_every_finished_step(pipeline, imagefolder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs"
    shutil.copytree(pipeline, out)
    before = torch.load(out / "pruned.pth", weights_only=True)
    code, stdout, _ = cli(compress_model.main, [f"--DATA_DIR={imagefolder}", f"--OUT_DIR={out}"] + COMPRESS_FLAGS,
                          capsys, monkeypatch)
    assert code == 0
    # the teacher's logits, the two students, the scratch control and the three trained candidates (struct1,
    # sparse1, the recovery one)
    assert "teacher logits: reusing" in stdout and "sensitivity: reusing" in stdout
    assert stdout.count("already trained") == 6
    after = torch.load(out / "pruned.pth", weights_only=True)
    assert after["model"] == before["model"]
    assert all(torch.equal(after["state_dict"][k], v) for k, v in before["state_dict"].items())
