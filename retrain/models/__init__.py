"""The planner and its training code: `architectures` (the transformer planner, pruning, growing, ONNX export),
`training` (fit, lr_at, OptimConfig, losses, checkpoints, export with a spec), `augment` (perception-noise copies of
frames) and `evaluate` (drive split, onnxruntime inference, student-vs-teacher reports)."""
