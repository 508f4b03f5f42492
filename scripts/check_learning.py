"""Did a run's training learn? Reads RUN_DIR/metrics.jsonl and, for each stage trained from fresh weights (the
baseline, the students, the scratch control), says how its loss and validation accuracy moved; fails when one
did not learn: a loss that is not finite, that did not fall from its first epoch to its last, or a last
validation accuracy under twice chance (100 / CLASSES %).

    python scripts/check_learning.py RUN_DIR CLASSES     # exit status 0: every such stage learned; 1: not

scripts/gpu_check.sh runs it after its smoke stage. It reads JSON only (no torch import: it takes no seconds).
"""
import json
import math
import os
import sys

FRESH_STAGES = ("baseline", "student", "scratch")  # labels, or label prefixes (student_<arch>), of such stages


def stage_curves(metrics_path):
    """{stage label: [(loss, val_accuracy) per epoch, in order]} of the stages trained from fresh weights; a
    resumed run appends later epochs, and a stage trained again starts its curve again at epoch 1."""
    curves = {}
    with open(metrics_path) as f:
        for line in f:
            record = json.loads(line)
            label = record["stage"]
            if not label.startswith(FRESH_STAGES):
                continue
            if record["epoch"] == 1:
                curves[label] = []
            curves.setdefault(label, []).append((record["loss"], record["val_accuracy"]))
    return curves


def verdicts(curves, classes):
    """[(stage, learned, one line that says how its loss and accuracy moved)] for each curve."""
    floor = 2 * 100 / classes
    out = []
    for label, curve in curves.items():
        (loss0, _), (loss1, acc1) = curve[0], curve[-1]
        learned = (all(math.isfinite(loss) for loss, _ in curve) and acc1 >= floor
                   and (len(curve) == 1 or loss1 < loss0))
        out.append((label, learned, f"{label}: loss {' -> '.join(f'{loss:.3f}' for loss, _ in curve)}, "
                                    f"val_accuracy {' -> '.join(f'{acc:.2f}%' for _, acc in curve)} "
                                    f"(at least {floor:.0f}% and a falling loss to pass)"))
    return out


def main(argv):
    if len(argv) != 2:
        print("usage: python scripts/check_learning.py RUN_DIR CLASSES", file=sys.stderr)
        return 2
    path = os.path.join(argv[0], "metrics.jsonl")
    if not os.path.isfile(path):
        print(f"error: no {path}: the run trained nothing", file=sys.stderr)
        return 1
    results = verdicts(stage_curves(path), int(argv[1]))
    for _, learned, line in results:
        print(f"learning check: {'ok' if learned else 'FAILED'}  {line}")
    failed = [label for label, learned, _ in results if not learned]
    if failed or not results:
        print(f"error: training did not learn in {', '.join(failed) or 'any stage'} (see the lines above)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
