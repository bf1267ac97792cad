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
    # a request of at most this many images that finds its model idle runs at once on the event loop (0 = off),
    # with this many onnxruntime threads when no other worker is busy either (0 = every core; 1 = no wide runs)
    inline_max_images: int = 8
    idle_threads: int = 0
    max_batch_size: int = 0  # 0: each model card's batching.max_batch_size
    max_queue_delay_ms: float = -1.0  # < 0: each model card's batching.max_queue_delay_ms
    max_request_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 16 * 1024 * 1024  # decompression-bomb guard, checked before decoding
    max_request_pixels: int = 64 * 1024 * 1024  # all of a /classify request's images together, from their headers
    max_images_per_request: int = 1024
    # admission control, per model version (see serving/batcher.py): refuse with 503 + Retry-After when the
    # queue holds this many images (0: the card's batching.max_queue_images; 0 there too: no hard bound) ...
    max_queue_images: int = 0
    queue_budget_ms: float = 100.0  # ... or when a new request's estimated queue wait is over this (0 = off)
    # inference requests are refused at once (HTTP 503, gRPC UNAVAILABLE) once the worker's event loop has run more
    # than max_loop_lag_ms behind for loop_lag_window_ms without a break (serving/loop_lag.py; 0 = off)
    max_loop_lag_ms: float = 50.0
    loop_lag_window_ms: float = 200.0
    max_queue_wait_ms: float = 1000.0  # a request still queued after this long is failed with 503 (0 = off)
    version_drain_s: float = 10.0  # a removed or unloaded version finishes its queued requests within this
    strict_readiness: bool = False  # ready only while every model in the repository has a version serving
    request_timeout_s: float = 60.0  # HTTP: 504 when a response has not started by then
    # HTTP: 408 and close when a request's headers are not complete by then, or its body stops arriving for this
    # long (0 = off)
    header_timeout_s: float = 10.0
    max_header_bytes: int = 64 * 1024  # HTTP: 431 and close past this much request line and headers (0 = no limit)
    max_concurrency: int = 128  # HTTP inference requests in progress per worker, past it 429 (0 = no limit)
    grpc_max_concurrent_rpcs: int = 128  # ModelInfer calls in progress per worker, past it RESOURCE_EXHAUSTED (0: none)
    # ModelInfer calls a worker asks grpc core for at once (serving.oip_grpc.CallIntake; 0: grpc.aio's one at a time)
    grpc_intake_width: int = 192
    # gRPC calls that arrived but the worker's event loop has not taken up yet (grpc core's backlog, where no
    # admission control reaches): past this many grpc refuses new ones at random, past twice as many all of them,
    # with CANCELLED (0: grpc's own 1000 and 3000, seconds of calls at this door's rate)
    grpc_max_pending_calls: int = 128
    # gRPC connections take no new calls past this age (calls in flight and streams run to their end), so that
    # long-lived channels spread again over workers and pods; clients reconnect on their own
    grpc_max_connection_age_s: float = 30.0
    grpc_reflection: bool = True  # gRPC server reflection (grpcurl list / describe without the .proto files)
    # /readyz and /livez answered on this port by a small process beside each worker, off its event loop and its
    # GIL, so that probes stay fast under overload (serving/health.py; 0 = off: probe the HTTP port)
    health_host: str = "127.0.0.1"
    health_port: int = 0
    liveness_stall_s: float = 10.0  # the health port's /livez fails once a worker's loop has not run for this long
    shutdown_drain_s: float = 5.0  # SIGTERM: not ready, but serving on, for this long before shutting down
    poll_interval_s: float = 2.0  # model repository re-scan for new versions (0 = off)
    # OpenTelemetry spans for the inference paths too; off: BentoML's tracing middleware halves HTTP throughput
    trace_requests: bool = False
    # the service's own log lines (loggers "cnnserve.*": model loads and removals, fallbacks, refusals);
    # BentoML's own loggers keep BentoML's level
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Settings:
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = env.get(f"CNNSERVE_{f.name.upper()}")
            if raw is not None:
                values[f.name] = _parse(raw, type(f.default), f"CNNSERVE_{f.name.upper()}")
        return cls(**values)

    def __post_init__(self) -> None:
        if self.log_level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ValueError(f"CNNSERVE_LOG_LEVEL={self.log_level!r}: expected DEBUG, INFO, WARNING, ERROR or CRITICAL")
        if self.health_port and self.health_port == self.grpc_port:  # both bind with SO_REUSEPORT: no error, and the
            # kernel would hand half the connections to the wrong server (a gRPC client got the probe's HTML error)
            raise ValueError(f"CNNSERVE_HEALTH_PORT and CNNSERVE_GRPC_PORT are both {self.grpc_port}: give the probe "
                             "port a port of its own")

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
