"""Checks run on a borrowed accelerator (CUDA training, onnxruntime-gpu); results in ``device_checks/results/``."""
