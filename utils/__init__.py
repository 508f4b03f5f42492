"""Helpers of the three scripts, one module per stage, in the order data flows through them (each imports only
from those above it):

config       constants at the top of each script, --NAME=VALUE flags, one-line errors
files        atomic writes, the artifact set of a run, the OUT_DIR lock, leftovers of killed runs
device       the device, autocast, exact float32, thread counts (each restored after its block)
dist         data parallelism: the layout of ranks, launching them, rank 0's jobs run by every rank
data         CIFAR-10 / ImageFolder decoded once and cached; the one train/validation split; batches
models       the ResNet family (stems, widths, per-block inner widths) rebuilt from a spec
checkpoint   self-describing checkpoints, plain CPU copies, parameter counts
measure      accuracy (eager, ONNX Runtime), the one latency helper, machine speed, the results table
train        the one training loop (TrainRecipe, Stage), objectives, metrics.jsonl
quantize     ONNX export, static INT8 with ONNX Runtime, PyTorch's dynamic quantization for comparison
prune        structured and unstructured pruning, ratio allocation, the AGP schedule
sparse       the compact archive of a sparse INT8 model (int8.sparse)
sensitivity  per-layer sensitivity to pruning and INT8
search       the search's typed state, its walks and the choice under the budget
plots        sensitivity, Pareto fronts, training curves
"""
