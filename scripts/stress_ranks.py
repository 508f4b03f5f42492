"""Stress the data-parallel start, stop and resume: ROUNDS rounds of train_baseline.py at 2 ranks on tiny data,
each round three starts in a fresh folder:
  1. ended mid-epoch after its second epoch, alternately by Ctrl-C (SIGINT to the launcher's process group, as a
     terminal sends it) and by SIGKILL of every process of the run;
  2. rerun to the end: it must resume, finish with exit status 0 and print its "next:" line;
  3. a fresh run of LONG_EPOCHS whose launcher alone is SIGKILLed mid-epoch: no rank may outlive it by more
     than LEFT_S seconds.
Prints a line a round and a summary; exit status 1 when a finished run exited non-zero or a rank was left behind.
Outside the test suite (minutes); run it alone.

    python scripts/stress_ranks.py [ROUNDS] [WORK_DIR]       # 20 rounds (about 12 minutes on 2 cores)
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
EPOCHS = 4      # of the run that is ended and resumed
LONG_EPOCHS = 200  # of the run whose launcher is killed: its ranks would train for minutes more without it
LEFT_S = 5      # seconds a rank may outlive its killed launcher
FLAGS = ["--VAL_SIZE=40", "--BATCH_SIZE=32", "--ARCH=resnet_s2_w32", "--AMP_DTYPE=float32", "--DEVICE=cpu",
         "--RANKS=2"]


def start(data, out, epochs, output=subprocess.PIPE):
    """train_baseline.py as a terminal starts it: in a process group of its own."""
    command = [sys.executable, os.path.join(ROOT, "train_baseline.py"), f"--DATA_DIR={data}", f"--OUT_DIR={out}",
               f"--EPOCHS={epochs}"] + FLAGS
    return subprocess.Popen(command, stdout=output, stderr=output, stdin=subprocess.DEVNULL, text=True,
                            start_new_session=True)


def epochs_done(out):
    path = os.path.join(out, "metrics.jsonl")
    return sum(1 for _ in open(path)) if os.path.exists(path) else 0


def wait_for_epochs(proc, out, n, timeout=120):
    deadline = time.time() + timeout
    while epochs_done(out) < n:
        if proc.poll() is not None or time.time() > deadline:
            raise RuntimeError(f"the run ended or stalled before epoch {n}: {(proc.communicate()[1] or '')[-2000:]}")
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch


def run_processes(proc):
    """The launcher and every rank under it (the ranks live in sessions of their own)."""
    try:
        return [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def end(proc, how):
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        for p in run_processes(proc):
            p.kill()
    proc.communicate(timeout=120)


def round_(data, work, i):
    """One round; returns (finished run's exit status, its error lines, ranks left behind by a killed launcher)."""
    out = os.path.join(work, f"round{i}")
    shutil.rmtree(out, ignore_errors=True)
    first = start(data, out, EPOCHS)
    wait_for_epochs(first, out, 2)
    end(first, "ctrl-c" if i % 2 == 0 else "kill")
    again = start(data, out, EPOCHS)
    stdout, stderr = again.communicate(timeout=300)
    errors = [line for line in stderr.replace("\r", "\n").splitlines() if "error" in line.lower()
              or "terminate" in line]
    status = again.returncode if "next: python compress_model.py" in stdout else f"{again.returncode}, unfinished"
    if "resuming" not in stdout:
        status = f"{status}, not resumed"  # the first run was not ended mid-run: the round proves nothing
    shutil.rmtree(out, ignore_errors=True)
    third = start(data, out, LONG_EPOCHS, subprocess.DEVNULL)  # ranks left behind would hold a pipe open
    wait_for_epochs(third, out, 1)
    ranks = run_processes(third)[1:]
    psutil.Process(third.pid).kill()
    third.wait(timeout=60)
    time.sleep(LEFT_S)
    left = [p.pid for p in ranks if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return status, errors, left


def main(argv):
    from conftest import write_imagefolder
    rounds = int(argv[0]) if argv else 20
    work = argv[1] if len(argv) > 1 else os.path.join(ROOT, "runs_stress")
    data = os.path.join(work, "data")
    if not os.path.isdir(data):
        write_imagefolder(data, 400, 80)
    failed, left_behind, t0 = 0, 0, time.time()
    for i in range(rounds):
        status, errors, left = round_(data, work, i)
        failed += status != 0
        left_behind += len(left)
        print(json.dumps({"round": i + 1, "ended_by": "ctrl-c" if i % 2 == 0 else "kill", "rerun_status": status,
                          "error_lines": errors, "ranks_left_by_killed_launcher": left}), flush=True)
    print(f"{rounds} rounds in {(time.time() - t0) / 60:.1f} min: finished reruns that exited non-zero: {failed}; "
          f"ranks left behind by a killed launcher: {left_behind}")
    return 1 if failed or left_behind else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
