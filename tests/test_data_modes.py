"""Images of any size and the two data paths (issue 30): decoded into memory (ram) or decoded from the files
batch by batch (stream), chosen by the memory available; the same batches, and so the same weights, either way."""
import contextlib
import io
import json
import os

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image

import train_baseline
from conftest import COMPRESS_FLAGS, EVAL_FLAGS, TRAIN_FLAGS, assert_one_line_error, cli, tiny_model
from utils.config import run_cli
from utils.data import ImageFiles, ImageRows, batches, choose_data_mode, decode_image, load_dataset, train_val_split
from utils.train import CrossEntropy, Stage, TrainRecipe, fit


def splits(imagefolder, cache, mode, size=32):
    data = load_dataset(imagefolder, False, str(cache), size, mode)
    return train_val_split(data["train"], 40, 0)


def epoch_of(split, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return list(batches(split.x, split.y, 32, "cpu", shuffle=True, train=True, generator=generator))


def test_stream_and_ram_give_the_same_batches_same_images_and_augmentations(imagefolder, tmp_path):
    (ram, _), (stream, _) = splits(imagefolder, tmp_path, "ram"), splits(imagefolder, tmp_path, "stream")
    assert isinstance(stream.x, ImageFiles) and isinstance(ram.x, ImageRows)  # rows of the decoded cache
    a, b = epoch_of(ram), epoch_of(stream)
    assert len(a) == len(b) == 200 // 32
    for x, y in zip(a, b):
        assert torch.equal(x.x, y.x) and torch.equal(x.y, y.y) and torch.equal(x.idx, y.idx)


def test_stream_and_ram_train_to_the_same_weights(imagefolder, tmp_path):
    weights = []
    for mode in ("ram", "stream"):
        train, val = splits(imagefolder, tmp_path / "cache", mode)
        model = tiny_model()
        recipe = TrainRecipe(lr=0.05, epochs=2, batch_size=32, momentum=0.9, weight_decay=5e-4, seed=0)
        fit(model, CrossEntropy(0.0), recipe, train, val, Stage("baseline", "baseline", str(tmp_path / f"{mode}.pth"),
                                                                 "cpu"))
        weights.append(model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_images_of_another_size_are_resized_and_centre_cropped_not_squashed(tmp_path):
    """A 128x32 image, red | green green | blue in quarters: at 16 px its centre (green) is kept, its aspect too
    (squashed, a quarter of it would be red and a quarter blue)."""
    img = np.zeros((32, 128, 3), np.uint8)
    img[:, :32, 0], img[:, 32:96, 1], img[:, 96:, 2] = 255, 255, 255
    Image.fromarray(img).save(tmp_path / "wide.png")
    out = decode_image(str(tmp_path / "wide.png"), 16)
    assert out.shape == (3, 16, 16) and out.dtype == torch.uint8
    assert (out[1] == 255).all() and (out[0] == 0).all() and (out[2] == 0).all()


def test_auto_streams_when_the_decoded_images_would_not_fit_the_memory_available(monkeypatch, capsys):
    need = 1000 * 3 * 64 * 64  # bytes of 1000 decoded 64 px images
    monkeypatch.setenv("DATA_MEMORY_AVAILABLE", str(need))  # under need x RAM_MARGIN
    assert choose_data_mode("auto", 1000, 64) == "stream"
    monkeypatch.setenv("DATA_MEMORY_AVAILABLE", str(2 * need))
    assert choose_data_mode("auto", 1000, 64) == "ram"
    assert capsys.readouterr().out.count("DATA_MODE=auto chose") == 2


def test_a_forced_ram_that_cannot_fit_stops_in_one_line_before_decoding(imagefolder, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DATA_MEMORY_AVAILABLE", "100000")
    code, _, err = cli(train_baseline.main, [f"--DATA_DIR={imagefolder}", f"--OUT_DIR={tmp_path}", "--DATA_MODE=ram"]
                       + TRAIN_FLAGS, capsys, monkeypatch)
    assert_one_line_error(code, err, "DATA_MODE=ram does not fit", "GiB available", "--DATA_MODE=stream")
    assert not [f for f in os.listdir(tmp_path) if f.startswith("data_")], "decoded before refusing"


# The tiny pipeline at 64 px from the files, at its shortest (one epoch a stage, one student, no control and no
# pruning: the student is shipped); the 2-rank run, with every kind of training job, is test_ranks.py's.
# A student of 16 channels: 8 crash torch 2.14.1's channels-last 1x1 stride-2 conv backward from 48 px up.
SHORT = {"train": ["--EPOCHS=1", "--IMAGE_SIZE=64"],
         "compress": ["--KD_EPOCHS=1", "--STUDENTS=stride2:16-32-64-128:1", "--FINAL_EPOCHS=0",
                      "--SCRATCH_CONTROL=false", "--STRUCT_STEPS=0", "--AGP_STEPS=0"], "evaluate": []}


@pytest.fixture(scope="module")
def stream_pipeline(imagefolder, tmp_path_factory):
    """The three scripts in one process at IMAGE_SIZE=64, DATA_MODE=stream: (output folder, their output)."""
    import compress_model
    import evaluate_results
    out = tmp_path_factory.mktemp("stream64")
    common = [f"--DATA_DIR={imagefolder}", f"--OUT_DIR={out}", "--DATA_MODE=stream"]
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(io.StringIO()) as said:
        for main, flags, short in ((train_baseline.main, TRAIN_FLAGS, SHORT["train"]),
                                   (compress_model.main, COMPRESS_FLAGS, SHORT["compress"]),
                                   (evaluate_results.main, EVAL_FLAGS, SHORT["evaluate"])):
            mp.setattr("sys.argv", ["script"] + common + flags + short)
            run_cli(main)
    return out, said.getvalue()


def test_the_pipeline_runs_at_64_px_from_the_files_and_ships_a_64_px_model(stream_pipeline):
    out, said = stream_pipeline
    assert said.count("streamed from its files, decoded at 64x64") == 3  # each script, its own way to the data
    assert not [f for f in os.listdir(out) if f.startswith("data_")], "nothing decoded into a cache"
    session = onnxruntime.InferenceSession(str(out / "int8.onnx"), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape[1:] == [3, 64, 64]
    assert json.load(open(out / "results.json"))["rows"]
