#!/usr/bin/env bash
# The GPU profile on a lent GPU machine, in stages that each fit one command (at most 10 minutes there):
#
#     bash scripts/gpu_check.sh smoke   # all three scripts on CUDA with small constants (about 2 minutes):
#                                       # device, versions, dtype, peak GPU memory and images/s of each stage
#     bash scripts/gpu_check.sh full    # the GPU profile's default run (benchmark.py --PROFILE=gpu); run it
#                                       # again after a time-out and it resumes from the last finished epoch
#
# Such a machine receives the repository only, so the data travels as one archive in an ignored folder. Make it
# once, from the repository root (about 19 MB):
#     mkdir -p gpu_data && tar -cJf gpu_data/cifar10.tar.xz -C ../shared/data cifar10
# It is unpacked with Python's tarfile (no xz program needed) into the work folder, once. Torch-Pruning travels
# the same way when the machine lacks it (it cannot reach a package index); make its wheel once:
#     pip download torch-pruning==1.6.1 --no-deps -d gpu_data/wheels
#
# Environment (all optional): GPU_CHECK_ARCHIVE (default gpu_data/cifar10.tar.xz, holding cifar10/ in
# ImageFolder layout); GPU_CHECK_WORK (default gpu_work/, ignored by git: the unpacked data and each stage's run
# folder, kept between commands so that `full` resumes); GPU_CHECK_FLAGS (extra flags for benchmark.py, e.g.
# "--DEVICE=cpu --EPOCHS=1" to try a stage without a GPU, as the tests do); OUT (default gpu_check/: each
# stage's log and result files, copied there while it runs, so a killed command still leaves them); PYTHON (default
# python3: the interpreter that runs every Python step, e.g. venv/bin/python when the venv is not activated).
#
# The smoke stage then checks that training learned (scripts/check_learning.py: each fresh stage's loss falls and
# its validation accuracy ends above twice chance) and fails loudly when it did not.
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:-}
if [ "$stage" != smoke ] && [ "$stage" != full ]; then
    echo "usage: bash scripts/gpu_check.sh smoke|full" >&2
    exit 2
fi
python=${PYTHON:-python3}
archive=${GPU_CHECK_ARCHIVE:-gpu_data/cifar10.tar.xz}
work=${GPU_CHECK_WORK:-gpu_work}
dest=${OUT:-gpu_check}/$stage
runs=$work/$stage
mkdir -p "$work" "$dest"
start=$(date +%s)

if [ ! -f "$work/data/.unpacked" ]; then
    if [ ! -f "$archive" ]; then
        echo "error: no data archive at $archive; make it with: mkdir -p gpu_data && tar -cJf gpu_data/cifar10.tar.xz -C ../shared/data cifar10" >&2
        exit 2
    fi
    rm -rf "$work/data"
    "$python" - "$archive" "$work/data" <<'PY'
import sys, tarfile
with tarfile.open(sys.argv[1]) as tar:  # any compression tarfile reads, .tar.xz included
    tar.extractall(sys.argv[2], filter="data") if hasattr(tarfile, "data_filter") else tar.extractall(sys.argv[2])
PY
    touch "$work/data/.unpacked"
fi
data=$(dirname "$(find "$work/data" -maxdepth 3 -type d -name train | head -n 1)")
echo "gpu_check $stage: data in $data ($(( $(date +%s) - start ))s)"
# asked without importing it (an import of torch costs seconds); benchmark.py prints the versions and the device
if ! "$python" -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("torch_pruning") is None)'; then
    "$python" -m pip install --quiet --no-index --no-deps --find-links gpu_data/wheels torch-pruning || {
        echo "error: torch_pruning is not installed and gpu_data/wheels has no wheel of it; make it with: pip download torch-pruning==1.6.1 --no-deps -d gpu_data/wheels" >&2
        exit 2; }
fi

case $stage in
    # 20,000 images (about 40 steps an epoch: enough to see learning), two epochs a stage, one step of each walk
    smoke) flags=(--PROFILE=gpu --REFERENCE_SECONDS=5 --TRAIN_SUBSET=20000 --EPOCHS=2 --KD_EPOCHS=2
                  --STRUCT_STEPS=1 --STRUCT_EPOCHS=1 --AGP_STEPS=1 --AGP_EPOCHS=1 --FINAL_EPOCHS=1
                  --SENS_IMAGES=500 --LATENCY_RUNS=20 --RUNS_B1=100 --RUNS_B64=5 --MAX_ACC_DROP=100)
           rm -rf "$runs" ;;  # from scratch every time: it is short
    full) flags=(--PROFILE=gpu --RESUME=true)
          if [ -f "$runs/benchmark.json" ]; then
              echo "gpu_check full: already finished in $runs (delete it to run again)"
          fi ;;
esac

copy_results() {  # what the run has written so far, into $dest
    for f in benchmark.json benchmark_progress.json results.md results.json search.json metrics.jsonl \
             training.png pareto.png sensitivity.png sensitivity.md; do
        if [ -f "$runs/$f" ]; then cp "$runs/$f" "$dest/"; fi
    done
}
status=0
if [ ! -f "$runs/benchmark.json" ]; then
    # shellcheck disable=SC2086  # GPU_CHECK_FLAGS is a list of flags
    DATA_DIR="$data" PYTHONUNBUFFERED=1 "$python" benchmark.py "${flags[@]}" --OUT_DIR="$runs" ${GPU_CHECK_FLAGS:-} \
        > >(tee -a "$dest/gpu_check.log") 2>&1 &
    pid=$!
    # a time-out's TERM stops the scripts too (benchmark.py's children), so a rerun does not meet them running
    trap 'pkill -TERM -P "$pid" 2>/dev/null || true; kill -TERM "$pid" 2>/dev/null || true; copy_results; exit 143' TERM INT
    seconds=0
    while kill -0 "$pid" 2>/dev/null; do  # copied every 15 s: the files come back even if this command is killed
        sleep 1
        seconds=$((seconds + 1))
        if [ $((seconds % 15)) -eq 0 ]; then copy_results; fi
    done
    wait "$pid" || status=$?
fi
copy_results
if [ "$stage" = smoke ] && [ "$status" -eq 0 ]; then  # the GPU profile must learn, not only run
    "$python" scripts/check_learning.py "$runs" "$(find "$data/train" -mindepth 1 -maxdepth 1 -type d | wc -l)" \
        2>&1 | tee -a "$dest/gpu_check.log" || status=$?
fi
echo "gpu_check $stage: exit status $status after $(( $(date +%s) - start ))s; files in $dest"
exit "$status"
