"""Pieces checked one by one: the distillation loss, pruning through fine-tuning, checkpoints, flags.
The compression pieces (structured rebuild, sparse storage, budget logic) are in test_compression.py."""
import math

import pytest
import torch

from utils.checkpoint import (Progress, clean_state_dict, load_checkpoint, load_model, weights_fingerprint,
                              write_checkpoint)
from utils.prune import magnitude_masks, make_pruning_permanent, prunable_layers, weight_sparsity
from utils.config import UserError, parse_flags
from utils.measure import accuracy_interval, paired_drop_interval
from utils.models import ResNet
from utils.train import Stage, TrainRecipe, cross_entropy_objective, fit, kd_loss


def test_kd_loss_matches_hand_computation():
    s = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    t = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]
    y = [1, 2]
    T, alpha = 4.0, 0.7

    def softmax(v, temp=1.0):
        e = [math.exp(x / temp) for x in v]
        return [x / sum(e) for x in e]
    kl = sum(sum(pt * math.log(pt / ps) for pt, ps in zip(softmax(ti, T), softmax(si, T))) for si, ti in zip(s, t)) / 2
    ce = -sum(math.log(softmax(si)[yi]) for si, yi in zip(s, y)) / 2
    expected = alpha * T * T * kl + (1 - alpha) * ce
    got = kd_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), T, alpha)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def tiny_data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = torch.randint(0, 80, (n, 3, 32, 32), generator=g, dtype=torch.uint8)
    x[torch.arange(n), y % 3] += 150
    return x, y


def tiny_model():
    torch.manual_seed(0)
    return ResNet(stem="stride2", widths=(8, 16, 32, 64), num_classes=4)


def test_per_layer_pruning_is_exact_and_kept_through_finetuning(tmp_path):
    model = tiny_model()
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)))
    magnitude_masks(model, {name: 0.4 for name in prunable_layers(model)})
    expected = sum(round(0.4 * m.weight.numel()) for m in prunable_layers(model).values()) / n
    assert weight_sparsity(model) == expected
    zeros_before = {k: v == 0 for k, v in clean_state_dict(model).items() if k.endswith("weight") and v.dim() > 1}
    recipe = TrainRecipe(lr=0.05, epochs=2, batch_size=16, momentum=0.9, weight_decay=5e-4, seed=0)
    stage = Stage("pruned", "pruned", str(tmp_path / "p.pth"), "cpu")
    fit(model, cross_entropy_objective(0.0), recipe, tiny_data(), tiny_data(16, 1), stage)
    make_pruning_permanent(model)
    after = clean_state_dict(model)
    assert all(torch.equal(after[k] == 0, z) for k, z in zeros_before.items()), "fine-tuning changed the mask"
    assert weight_sparsity(model) == expected
    saved = load_model(load_checkpoint(str(tmp_path / "p.pth"), "pruned"), "p.pth")
    assert weight_sparsity(saved) == expected


def test_checkpoint_round_trip_rebuilds_the_architecture(tmp_path):
    model = tiny_model().eval()
    path = str(tmp_path / "m.pth")
    write_checkpoint(path, {"stage": "student", "model": model.spec}, model, Progress(1, 1))
    loaded = load_model(load_checkpoint(path, "student"), path)
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(loaded(x), model(x))
    assert weights_fingerprint(loaded.state_dict()) == weights_fingerprint(model.state_dict())
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in torch.load(path, weights_only=True)["state_dict"])


@pytest.mark.parametrize("argv, message", [
    (["--NOPE=1"], "unknown constant --NOPE"),
    (["--EPOCHS=abc"], "--EPOCHS expects int"),
    (["--EPOCHS=1.5"], "--EPOCHS expects int"),
    (["--FLAG=1"], "--FLAG expects bool"),
    (["EPOCHS=3"], "unexpected argument"),
    (["--EPOCHS"], "needs a value"),
])
def test_bad_flags_are_errors(argv, message):
    with pytest.raises(UserError, match=message):
        parse_flags({"EPOCHS": 3, "LR": 0.1, "NAME": "x", "FLAG": True}, argv)


def test_flags_take_the_type_of_their_default():
    cfg = parse_flags({"EPOCHS": 3, "LR": 0.1, "NAME": "x", "FLAG": True},
                      ["--EPOCHS=5", "--LR", "1", "--NAME=a b", "--FLAG=False"])
    assert cfg == {"EPOCHS": 5, "LR": 1.0, "NAME": "a b", "FLAG": False}
    assert isinstance(cfg["LR"], float)


def test_config_layers_defaults_profile_environment_flags(monkeypatch):
    from utils.config import resolve_config
    defaults = {"DATA_DIR": "data", "EPOCHS": 3, "ARCH": "a", "PROFILE": "auto", "DEVICE": "auto"}
    profiles = {"gpu": {"EPOCHS": 40, "ARCH": "b"}}
    monkeypatch.setenv("DATA_DIR", "/env/data")
    cpu = resolve_config(defaults, [], profiles, lambda d: "cpu")
    assert cpu == {**defaults, "DATA_DIR": "/env/data", "PROFILE": "cpu", "DEVICE": "cpu"}
    gpu = resolve_config(defaults, ["--EPOCHS=5"], profiles, lambda d: "cuda")
    assert (gpu["EPOCHS"], gpu["ARCH"], gpu["PROFILE"]) == (5, "b", "gpu")
    flagged = resolve_config(defaults, ["--DATA_DIR=/flag"], profiles, lambda d: "cpu")
    assert flagged["DATA_DIR"] == "/flag"


def test_accuracy_interval_is_the_wilson_interval():
    lo, hi = accuracy_interval(torch.arange(100) < 50)  # 50 of 100
    assert (lo, hi) == (pytest.approx(40.38, abs=0.01), pytest.approx(59.62, abs=0.01))
    lo, hi = accuracy_interval(torch.ones(10, dtype=torch.bool))
    assert hi == pytest.approx(100.0) and 60 < lo < 75  # never past 100%, unlike the normal approximation


def test_paired_drop_interval_counts_only_disagreements_and_is_deterministic():
    base = torch.arange(1000) % 10 < 8  # 80%
    assert paired_drop_interval(base, base.clone()) == [0.0, 0.0]
    other = base.clone()
    other[:40] = ~other[:40]  # 40 images flipped: 32 right -> wrong, 8 wrong -> right: 2.4 points lower
    lo, hi = paired_drop_interval(base, other)
    assert lo < 2.4 < hi and hi - lo < 3.0
    assert paired_drop_interval(base, other) == [lo, hi]
    unpaired = 2 * 1.96 * (2 * 0.8 * 0.2 / 1000) ** 0.5 * 100  # width if the two were independent samples
    assert hi - lo < unpaired
