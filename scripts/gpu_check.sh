#!/usr/bin/env bash
# The GPU profile end to end on the full CIFAR-10 copy, sized for one short try on a borrowed GPU machine
# (estimated 6-8 minutes on one H200; see README). It prints each stage's wall time, images per second and
# accuracies, and checks the GPU targets (benchmark.py).
#
# Such a machine receives the repository only, so the data travels as one archive in an ignored folder.
# Make it once, from the repository root (about 19 MB):
#     mkdir -p gpu_data && tar -cJf gpu_data/cifar10.tar.xz -C ../shared/data cifar10
# then run this script there with gpu_data carried along:  bash scripts/gpu_check.sh
#
# Environment (all optional): GPU_CHECK_ARCHIVE (default gpu_data/cifar10.tar.xz, holding cifar10/ in
# ImageFolder layout), GPU_CHECK_FLAGS (extra flags for benchmark.py, e.g. "--DEVICE=cpu --EPOCHS=1" to try the
# path without a GPU, as the tests do), OUT (a folder that receives the logs and result files; default ./gpu_check).
set -euo pipefail
cd "$(dirname "$0")/.."
archive=${GPU_CHECK_ARCHIVE:-gpu_data/cifar10.tar.xz}
dest=${OUT:-gpu_check}
work=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$work"' EXIT
if [ ! -f "$archive" ]; then
    echo "error: no data archive at $archive; make it with: mkdir -p gpu_data && tar -cJf gpu_data/cifar10.tar.xz -C ../shared/data cifar10" >&2
    exit 2
fi
mkdir -p "$dest"
start=$(date +%s)
tar -xf "$archive" -C "$work"
data=$(dirname "$(find "$work" -maxdepth 3 -type d -name train | head -n 1)")
echo "gpu_check: data unpacked to $data in $(( $(date +%s) - start ))s"
python3 -c 'import torch, onnxruntime; print("gpu_check: torch", torch.__version__, "onnxruntime", onnxruntime.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
set +e
# shellcheck disable=SC2086  # GPU_CHECK_FLAGS is a list of flags
DATA_DIR="$data" PYTHONUNBUFFERED=1 python3 benchmark.py --PROFILE=gpu --OUT_DIR="$work/runs" ${GPU_CHECK_FLAGS:-} 2>&1 | tee "$dest/gpu_check.log"
status=${PIPESTATUS[0]}
set -e
for f in benchmark.json results.md results.json training.png pareto.png search.json; do
    if [ -f "$work/runs/$f" ]; then cp "$work/runs/$f" "$dest/"; fi
done
echo "gpu_check: exit status $status after $(( $(date +%s) - start ))s; files in $dest"
exit "$status"
