"""Service settings from CNNSERVE_* variables, and what they switch."""

from pathlib import Path

import pytest

from serving.settings import Settings


def test_settings_parse_each_type_and_name_the_variable_in_errors():
    s = Settings.from_env({"CNNSERVE_MODEL_DIR": "/m", "CNNSERVE_WORKERS": "3", "CNNSERVE_POLL_INTERVAL_S": "0.5",
                           "CNNSERVE_TRACE_REQUESTS": "true"})
    assert (s.model_dir, s.workers, s.poll_interval_s, s.trace_requests) == (Path("/m"), 3, 0.5, True)
    assert Settings.from_env({"CNNSERVE_TRACE_REQUESTS": "0"}).trace_requests is False
    with pytest.raises(ValueError, match="CNNSERVE_TRACE_REQUESTS='maybe'"):
        Settings.from_env({"CNNSERVE_TRACE_REQUESTS": "maybe"})
    with pytest.raises(ValueError, match="CNNSERVE_WORKERS='two': expected int"):
        Settings.from_env({"CNNSERVE_WORKERS": "two"})
    assert Settings.from_env({"CNNSERVE_LOG_LEVEL": "debug"}).log_level == "debug"
    with pytest.raises(ValueError, match="CNNSERVE_LOG_LEVEL='loud'"):
        Settings.from_env({"CNNSERVE_LOG_LEVEL": "loud"})


def test_the_probe_port_may_not_be_the_grpc_port():
    """Both bind with SO_REUSEPORT, so sharing one raised nothing and split the connections between the servers."""
    with pytest.raises(ValueError, match="CNNSERVE_HEALTH_PORT and CNNSERVE_GRPC_PORT are both 8001"):
        Settings.from_env({"CNNSERVE_HEALTH_PORT": "8001"})
    assert Settings.from_env({"CNNSERVE_HEALTH_PORT": "8002"}).health_port == 8002


def test_the_test_servers_ports_are_never_handed_out_twice(monkeypatch):
    import socket

    from tests import server

    offered = iter([40001, 40001, 40002])  # the kernel may offer a port again at once

    class Socket:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def bind(self, address):
            self.port = next(offered)

        def getsockname(self):
            return ("127.0.0.1", self.port)

    monkeypatch.setattr(server, "_HANDED_OUT", set())
    monkeypatch.setattr(socket, "socket", Socket)
    assert [server.free_port(), server.free_port()] == [40001, 40002]


def test_inference_paths_skip_tracing_unless_asked():
    from serving.service import INFERENCE_PATHS, tracing_config

    assert tracing_config(Settings()) == {"excluded_urls": INFERENCE_PATHS}
    assert tracing_config(Settings(trace_requests=True)) == {}


def test_the_grpc_backlog_limit_reaches_grpc_core(monkeypatch):
    # calls wait in grpc core's backlog before the event loop (and any admission check) sees them: grpc's own
    # limits (1000 / 3000) held them for seconds at twice the capacity (benchmarks/results/overload.md)
    import asyncio

    import grpc

    from serving.oip_grpc import GrpcServer

    created = {}
    real_server = grpc.aio.server
    monkeypatch.setattr(grpc.aio, "server", lambda **kw: created.update(kw) or real_server(**kw))

    async def options(pending: int) -> dict:  # grpc.aio's server wants a running loop
        GrpcServer(None, Settings(grpc_max_pending_calls=pending))
        return dict(created["options"])

    bounded = asyncio.run(options(64))
    assert bounded["grpc.server.max_pending_requests"] == 64
    assert bounded["grpc.server.max_pending_requests_hard_limit"] == 128
    assert "grpc.server.max_pending_requests" not in asyncio.run(options(0))
