"""scripts/check_learning.py, which the GPU check's smoke stage runs: a run whose fresh stages learned passes, one
whose loss did not fall or whose accuracy stayed near chance fails loudly (exit status 1, the stage named)."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def check(tmp_path, curves):
    """Run the check on a metrics.jsonl of {label: [(loss, val_accuracy) per epoch]}, 10 classes; a label may
    hold several curves in a list of lists (the stage trained again from epoch 1)."""
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for label, runs in curves.items():
            for curve in (runs if isinstance(runs[0], list) else [runs]):
                for epoch, (loss, acc) in enumerate(curve, 1):
                    f.write(json.dumps({"stage": label, "epoch": epoch, "loss": loss, "val_accuracy": acc}) + "\n")
    return subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "check_learning.py"), str(tmp_path), "10"],
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)


def test_a_run_whose_fresh_stages_learned_passes(tmp_path):
    proc = check(tmp_path, {"baseline": [(2.0, 35.0), (1.5, 48.0)], "student": [(3.0, 40.0), (2.2, 51.0)],
                            "struct1": [(9.0, 11.0)], "scratch": [(1.9, 30.0), (1.4, 45.0)]})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("learning check: ok") == 3 and "struct1" not in proc.stdout  # fine-tunes not judged


def test_a_stage_that_did_not_learn_fails_loudly_with_its_name(tmp_path):
    """The curve of the bf16 defect: the loss rose epoch by epoch and the accuracy stayed at chance."""
    proc = check(tmp_path, {"baseline": [(2.27, 10.2), (2.79, 10.9), (6.09, 10.4), (9.99, 10.5)],
                            "student": [(3.0, 40.0), (2.2, 51.0)]})
    assert proc.returncode == 1
    assert "FAILED  baseline" in proc.stdout and "error: training did not learn in baseline" in proc.stderr


def test_a_falling_loss_at_chance_accuracy_fails(tmp_path):
    assert check(tmp_path, {"student": [(2.3, 10.0), (2.2, 12.0)]}).returncode == 1


def test_a_stage_trained_again_is_judged_by_its_last_curve(tmp_path):
    proc = check(tmp_path, {"baseline": [[(9.0, 10.0), (9.5, 10.0)], [(2.0, 30.0), (1.5, 40.0), (1.2, 50.0)]]})
    assert proc.returncode == 0 and "2.000 -> 1.500 -> 1.200" in proc.stdout, proc.stdout
