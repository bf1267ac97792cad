"""Service settings: read once at start from ``CNNSERVE_*`` environment variables."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    model_dir: Path = Path("exports")
    device: str = "auto"  # auto | cpu | cuda
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 8001  # 0 disables the gRPC server
    workers: int = 0  # BentoML worker processes; 0 = one per CPU core
    intra_op_threads: int = 0  # 0: cores / workers
    max_batch_size: int = 0  # 0: each model card's batching.max_batch_size
    max_queue_delay_ms: float = -1.0  # < 0: each model card's batching.max_queue_delay_ms
    max_request_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 16 * 1024 * 1024  # decompression-bomb guard, checked before decoding
    max_images_per_request: int = 1024
    request_timeout_s: float = 60.0  # HTTP: 504 when a response has not started by then
    poll_interval_s: float = 2.0  # model repository re-scan for new versions (0 = off)
    # OpenTelemetry spans for the inference paths too; off: BentoML's tracing middleware halves HTTP throughput
    trace_requests: bool = False

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = env.get(f"CNNSERVE_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _parse(raw, type(f.default), f"CNNSERVE_{f.name.upper()}")
        return cls(**values)

    @property
    def worker_count(self) -> int:
        return self.workers if self.workers > 0 else os.cpu_count() or 1

    @property
    def threads_per_session(self) -> int:
        """onnxruntime intra-op threads: the cores shared out between the workers unless set."""
        if self.intra_op_threads > 0:
            return self.intra_op_threads
        return max(1, (os.cpu_count() or 1) // self.worker_count)


def _parse(raw: str, kind: type, name: str) -> object:
    if kind is bool:
        if raw.strip().lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off", ""):
            raise ValueError(f"{name}={raw!r}: expected true or false")
        return raw.strip().lower() in ("1", "true", "yes", "on")
    if kind is type(Path()):
        return Path(raw)
    try:
        return kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw!r}: expected {kind.__name__}") from None
