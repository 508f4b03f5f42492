"""Shared helpers of the three scripts: config (constants and flags), data, models, checkpoint,
train (the one training loop), compress (pruning, ONNX export, INT8) and measure (accuracy, size, latency)."""
