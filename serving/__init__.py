"""cnnserve serving: BentoML + onnxruntime service (no torch)."""

__version__ = "0.1.0"
