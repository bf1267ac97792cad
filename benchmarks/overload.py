"""Overload benchmark: open-loop load at a multiple of the measured capacity, over OIP REST (binary tensors)
and gRPC, against the service as `make serve` runs it (one worker per core, default settings).

    python -m benchmarks.overload [--seconds 30] [--factor 2] [--doors http grpc]

Per door: capacity = answered requests/s of 64 closed-loop clients (the burst's generator in closed loop: 16 did
not keep a slow day's gRPC door busy); then ``factor`` x capacity (or ``--rate``) open loop for ``seconds`` while
``/readyz`` is probed every 100 ms (on the HTTP port, on the probe port, and on a control: the probe port's
process answering for no service, which shows what the loaded machine alone costs a probe) and a light client
(20 req/s) keeps sending through the burst and 5 s past it. The burst comes from ``benchmarks/native/openloop.c``
(``--generator native``, the default: a few microseconds of CPU per request, built with gcc and libnghttp2 on first
use) or from the Python generators (``--generator python``: ``loadgen.HttpLoad``, at most ``--connections``
keep-alive connections as wrk2 keeps a fixed set; ``loadgen.GrpcLoad``, grpcio futures over 4 channels), from a
process of its own, so that the probe and the light client measure the server and not the generator's own backlog.
The capacity run, the light client and the probe are Python.
Reported beside the goals of the issue: answered p99 <= 250 ms, rejections answered in <= 10 ms (p99),
goodput >= 90 % of capacity, worker RSS growth <= 20 %, /readyz p99 <= 50 ms, latency back to normal <= 1 s
after the burst. Writes benchmarks/results/overload.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing
import pickle
import re
import socket
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx

from benchmarks.loadgen import (
    GrpcLoad,
    HttpLoad,
    NativeLoad,
    Sample,
    Service,
    collector_paused,
    command,
    http_request,
    native_samples,
    percentile_ms,
    probe,
    sample_images,
)
from benchmarks.publish import write_results
from serving import probe_process

GOALS = {"answered_p99_ms": 250, "rejected_p99_ms": 10, "goodput_fraction": 0.9, "rss_growth_fraction": 0.2,
         "readyz_p99_ms": 50, "probe_port_readyz_p99_ms": 50, "recovery_s": 1.0}
LIGHT_RATE = 20.0  # requests/s of the light client that measures latency through and after the burst
AFTER_S = 5.0


def http_load(http_port: int, connections: int, binary: bool = True) -> HttpLoad:
    return HttpLoad(http_port, http_request(http_port, binary, sample_images()), "http", connections)


def light_load(kind: str, service: Service, seconds: float) -> Awaitable[list[Sample]]:
    """The light client: ``LIGHT_RATE`` requests/s for ``seconds``, in this process."""
    if kind == "grpc":
        return asyncio.to_thread(GrpcLoad(service.grpc_port, sample_images(), channels=1).open_loop, LIGHT_RATE,
                                 seconds)
    return http_load(service.http_port, 4).open_loop(LIGHT_RATE, seconds)


@contextlib.contextmanager
def control_probe_port(directory: Path) -> Iterator[int]:
    """A probe port that belongs to no service: ``serving.probe_process``, as each worker starts it, answering from a
    fixed readiness file, in a process of its own. Probed beside the service's probe port through a burst, it shows
    what the loaded machine alone costs a probe (scheduling on the shared cores, the probing client's own delays)."""
    readiness, beats = directory / "control-readiness.json", directory / "control-beats"
    readiness.write_text('{"ready": true}')
    beats.write_bytes(bytes(probe_process.BEAT.size))  # one worker that never beats: not judged
    with socket.create_server(("127.0.0.1", 0)) as listener:
        process = subprocess.Popen(probe_process.command(listener.fileno(), readiness, beats, 1, 10.0),
                                   stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, pass_fds=(listener.fileno(),))
        try:
            yield listener.getsockname()[1]
        finally:
            probe_process.end(process)


GRPC_CONNECTIONS = 4
CAPACITY_CLIENTS = 64  # closed-loop requests out at once in the capacity run: enough to keep both workers busy


def burst(kind: str, http_port: int, grpc_port: int, connections: int, rate: float, seconds: float,
          binary: bool = True, generator: str = "native") -> tuple[str | bytes, float]:
    """The open-loop burst, run in a process of its own (its clock, ``time.monotonic()``, is this one's loop time);
    returns its samples, unparsed (``read_burst``), and the CPU seconds the generator spent sending them.

    Unparsed: reading half a million samples takes a core for a second or two; done as the burst ends, in this
    process or the caller's (whose event loop runs the light client and the probes), it showed as a 100-200 ms
    stall of the light client a second after the burst, which ``recovery_s`` then charged to the server."""
    if generator == "native":
        port, count = (grpc_port, GRPC_CONNECTIONS) if kind == "grpc" else (http_port, connections)
        load = NativeLoad(kind, port, sample_images(), count, binary)
        return load.open_loop_output(rate, seconds), load.cpu_s
    with collector_paused():
        cpu = time.process_time()
        if kind == "grpc":
            samples = GrpcLoad(grpc_port, sample_images()).open_loop(rate, seconds)
        else:
            samples = asyncio.run(http_load(http_port, connections, binary).open_loop(rate, seconds))
        return pickle.dumps(samples), time.process_time() - cpu


def read_burst(kind: str, output: str | bytes) -> list[Sample]:
    """``burst``'s samples from what it returned."""
    return native_samples(kind, output) if isinstance(output, str) else pickle.loads(output)


def loop_lag_buckets(url: str) -> dict[float, float]:
    """The workers' event-loop lag histogram (``cnnserve_event_loop_lag_seconds``, summed over workers): cumulative
    count per bucket bound (s)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    found = re.findall(r'cnnserve_event_loop_lag_seconds_bucket\{le="([^"]+)"\} ([\d.e+]+)', text)
    return {float(le): float(count) for le, count in found}


def lag_p99_ms(before: dict[float, float], after: dict[float, float]) -> float | None:
    """The bucket bound (ms) under which 99 % of the lag samples between the two scrapes fall (1 ms resolution)."""
    counts = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
    total = counts.get(math.inf, 0.0)
    if not total:
        return None
    return next(1000 * le for le, n in counts.items() if n >= 0.99 * total)


def recovery_s(light: list[Sample], burst_end: float, normal_s: float) -> float:
    """Seconds after the burst's end until the light client's latency stays at or below ``normal_s``."""
    late = sorted((s for s in light if s.due >= burst_end - 1), key=lambda s: s.due)
    bad = [s for s in late if s.outcome != "ok" or s.latency_s > normal_s]
    return round(max(0.0, bad[-1].due - burst_end), 2) if bad else 0.0


async def measure(kind: str, service: Service, control_port: int, seconds: float, factor: float, connections: int,
                  rate: float | None = None, binary: bool = True, generator: str = "native") -> dict:
    """``control_port``: ``control_probe_port``'s; ``rate``: offered requests/s, in place of ``factor`` x the measured
    capacity; ``binary``: OIP REST binary tensors (else JSON) for the capacity run and the burst; ``generator``: the
    burst's (``burst``)."""
    loop = asyncio.get_running_loop()
    native = NativeLoad(kind, service.grpc_port if kind == "grpc" else service.http_port, sample_images(),
                        GRPC_CONNECTIONS if kind == "grpc" else CAPACITY_CLIENTS, binary) \
        if generator == "native" else None
    if native is not None:
        await asyncio.to_thread(native.closed_loop, CAPACITY_CLIENTS, 2)  # warm-up
    elif kind == "http":
        await http_load(service.http_port, CAPACITY_CLIENTS, binary).closed_loop(2)
    else:
        await asyncio.to_thread(GrpcLoad(service.grpc_port, sample_images()).closed_loop, CAPACITY_CLIENTS, 2)
    server_cpu, generator_cpu, t0 = service.server.cpu_seconds(), time.process_time(), loop.time()
    if native is not None:
        measured = await asyncio.to_thread(native.closed_loop, CAPACITY_CLIENTS, 10)
        generator_cpu -= native.cpu_s  # its CPU is a child's: counted below as this process's
    elif kind == "http":
        measured = await http_load(service.http_port, CAPACITY_CLIENTS, binary).closed_loop(10)
    else:
        measured = await asyncio.to_thread(GrpcLoad(service.grpc_port, sample_images()).closed_loop,
                                           CAPACITY_CLIENTS, 10)
    elapsed = loop.time() - t0
    capacity_cores = (round((service.server.cpu_seconds() - server_cpu) / elapsed, 2),
                      round((time.process_time() - generator_cpu) / elapsed, 2))
    capacity = sum(s.outcome == "ok" for s in measured) / 10
    offered = rate or factor * capacity
    baseline = await light_load(kind, service, 3)
    normal_s = max(2 * float(sorted(s.latency_s for s in baseline)[int(0.99 * len(baseline))]), 0.005)
    rss_before = service.worker_rss_mb()
    with collector_paused(), ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        pool.submit(int).result()  # the process started before the clock does
        start, server_cpu, lag_before = loop.time(), service.server.cpu_seconds(), loop_lag_buckets(service.url)
        sent = loop.run_in_executor(pool, burst, kind, service.http_port, service.grpc_port, connections, offered,
                                    seconds, binary, generator)
        burst_server_cpu: list[float] = []  # the server's CPU seconds when the burst's last answer is in
        lag_after: list[asyncio.Future[dict[float, float]]] = []  # scraped off the loop: the light client goes on
        sent.add_done_callback(lambda _: (burst_server_cpu.append(service.server.cpu_seconds() - server_cpu),
                                          lag_after.append(loop.run_in_executor(None, loop_lag_buckets, service.url))))
        (burst_output, burst_cpu), light, readyz, probe_port_readyz, control_readyz = await asyncio.gather(
            sent, light_load(kind, service, seconds + AFTER_S), probe(f"{service.url}/readyz", 0.1, seconds),
            probe(f"http://127.0.0.1:{service.health_port}/readyz", 0.1, seconds),
            probe(f"http://127.0.0.1:{control_port}/readyz", 0.1, seconds))
    rss_after = service.worker_rss_mb()
    burst_samples = read_burst(kind, burst_output)
    ok = [s.latency_s for s in burst_samples if s.outcome == "ok"]
    rejected = [s.latency_s for s in burst_samples if s.outcome == "rejected"]
    errors: dict[str, int] = {}
    rejected_by: dict[str, int] = {}
    for s in burst_samples:
        if s.outcome == "rejected":
            rejected_by[s.reason] = rejected_by.get(s.reason, 0) + 1
        elif s.outcome != "ok":
            errors[s.outcome] = errors.get(s.outcome, 0) + 1
    result = {
        "door": kind, "generator": generator, "capacity_per_s": round(capacity), "offered_per_s": round(offered),
        "connections": connections if kind == "http" else None,
        "sent": len(burst_samples), "answered": len(ok), "rejected": len(rejected),
        "rejected_by": rejected_by, "errors": errors,
        "goodput_per_s": round(len(ok) / seconds), "goodput_fraction": round(len(ok) / seconds / capacity, 3),
        "answered_p50_ms": percentile_ms(ok, 50), "answered_p99_ms": percentile_ms(ok, 99),
        "rejected_p50_ms": percentile_ms(rejected, 50), "rejected_p99_ms": percentile_ms(rejected, 99),
        "errors_p99_ms": percentile_ms([s.latency_s for s in burst_samples if s.outcome not in ("ok", "rejected")],
                                       99),
        "readyz_p99_ms": percentile_ms(readyz, 99), "readyz_max_ms": percentile_ms(readyz, 100),
        # the same probe on the probe port (CNNSERVE_HEALTH_PORT, answered off the event loop), where the
        # Kubernetes manifests send kubelet's probes
        "probe_port_readyz_p99_ms": percentile_ms(probe_port_readyz, 99),
        "probe_port_readyz_max_ms": percentile_ms(probe_port_readyz, 100),
        # and on the control, a probe port of no service: the floor the loaded machine and this client set
        "control_readyz_p99_ms": percentile_ms(control_readyz, 99),
        # the server's own view: how late the workers' event loops ran during the burst (what a request or a probe
        # waits on the server before it is looked at; the rest of the latencies above is the clients' own lag)
        "server_loop_lag_p99_ms": lag_p99_ms(lag_before, await lag_after[0]),
        "generator_late_p99_ms": percentile_ms([s.sent_late_s for s in burst_samples], 99),
        "light_normal_ms": round(1000 * normal_s, 2),
        "recovery_s": recovery_s(light, start + seconds, normal_s),
        "rss_before_mb": round(rss_before), "rss_after_mb": round(rss_after),
        "rss_growth_fraction": round(rss_after / rss_before - 1, 3),
        # CPU in cores of the server (all its processes) and of the generator: capacity run, then burst
        "capacity_server_cores": capacity_cores[0], "capacity_generator_cores": capacity_cores[1],
        "burst_server_cores": round(burst_server_cpu[0] / seconds, 2),
        "burst_generator_cores": round(burst_cpu / seconds, 2),
    }
    print(result, flush=True)
    return result


def verdicts(row: dict) -> dict[str, bool]:
    return {"answered_p99_ms": (row["answered_p99_ms"] or 0) <= GOALS["answered_p99_ms"],
            "rejected_p99_ms": row["rejected_p99_ms"] is None or row["rejected_p99_ms"] <= GOALS["rejected_p99_ms"],
            "goodput_fraction": row["goodput_fraction"] >= GOALS["goodput_fraction"],
            "rss_growth_fraction": row["rss_growth_fraction"] <= GOALS["rss_growth_fraction"],
            "readyz_p99_ms": (row["readyz_p99_ms"] or 0) <= GOALS["readyz_p99_ms"],
            "probe_port_readyz_p99_ms": (row.get("probe_port_readyz_p99_ms") or 0) <= GOALS["probe_port_readyz_p99_ms"],
            "recovery_s": row["recovery_s"] <= GOALS["recovery_s"]}


def by_reason(row: dict) -> str:
    """Which mechanisms refused, as ' (N loop lag, M queue estimate)'; empty in results from before it was kept."""
    reasons = row.get("rejected_by") or {}
    return " (" + ", ".join(f"{n} {reason}" for reason, n in sorted(reasons.items())) + ")" if reasons else ""


def cores(row: dict) -> str:
    """'server / generator -> server / generator' cores; empty in results from before they were kept."""
    if "burst_server_cores" not in row:
        return ""
    return (f"{row['capacity_server_cores']} / {row['capacity_generator_cores']} → {row['burst_server_cores']} / "
            f"{row['burst_generator_cores']}")


def control(row: dict) -> str:
    """' / N' for the control probe's p99; empty in results from before it was kept."""
    return "" if row.get("control_readyz_p99_ms") is None else f" / {row['control_readyz_p99_ms']}"


def lag_cell(row: dict) -> str:
    lag = row.get("server_loop_lag_p99_ms")
    return "" if lag is None else f"≤ {lag:g}"


GENERATORS = {
    "native": "the burst comes from `benchmarks/native/openloop.c` (C; HTTP/1.1 over at most {} keep-alive "
              "connections; gRPC: unary calls over 4 HTTP/2 connections, libnghttp2), run from a process of its own",
    "python": "the burst comes from a Python process of its own (HTTP: asyncio protocol over at most {} keep-alive "
              "connections; gRPC: grpcio futures over 4 channels)",
}


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# Overload: open loop at a multiple of capacity",
        "",
        f"`{command('benchmarks.overload')}`: the service as `make serve` runs it (2 workers, default settings "
        "unless the command sets some), mnist-cnn, single-image requests (HTTP: "
        f"OIP REST {'JSON' if args.json else 'binary'}); {GENERATORS[args.generator].format(args.connections)}, "
        "the light client and the /readyz probes (httpx, every 100 ms: one on the HTTP port, keep-alive, one on the "
        "probe port that the Kubernetes manifests probe, `CNNSERVE_HEALTH_PORT`, which ends each connection, so a "
        "new one each time, as kubelet's, and one on a *control*: the probe port's process, `serving.probe_process`, "
        "answering for no service, whose p99 is what the loaded machine and the probing client alone cost a probe) "
        "from another process, all on the same 2 cores as the server. "
        f"Capacity: {CAPACITY_CLIENTS} closed-loop clients of the same generator. Goals from the issue in brackets; "
        "each cell says "
        "whether it is met. *Generator late*: how long after its due time the burst's p99 request went out; when "
        "it is large the generator, not the server, set the pace. *Cores*: CPU of the server's processes and of "
        "the load generator, in cores, in the capacity run and in the burst: what the generator takes at twice "
        "the rate, the server cannot have on these 2 cores. *Server loop lag*: the p99 of how late the workers' "
        "event loops ran during the burst (`cnnserve_event_loop_lag_seconds`, 1 ms buckets: an upper bound), the "
        "server's own share of any request's or probe's wait; the clients measure that plus their own delays, "
        "on cores they share with the server.",
        "",
        "| door | capacity/s | offered/s | goodput/s (≥ 90 %) | answered p50 / p99 ms (≤ 250) | rejected | "
        "rejected p99 ms (≤ 10) | errors | /readyz p99 ms, HTTP port / probe port (≤ 50) / control | "
        "recovery s (≤ 1) | worker RSS MB (≤ +20 %) | "
        "generator late p99 ms | cores server / generator: capacity → burst | server loop lag p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        v = {k: "✓" if ok else "✗" for k, ok in verdicts(r).items()}
        lines.append(
            f"| {r['door']} | {r['capacity_per_s']} | {r['offered_per_s']} | {r['goodput_per_s']} "
            f"({100 * r['goodput_fraction']:.0f} %) {v['goodput_fraction']} | {r['answered_p50_ms']} / "
            f"{r['answered_p99_ms']} {v['answered_p99_ms']} | {r['rejected']} of {r['sent']}{by_reason(r)} | "
            f"{r['rejected_p99_ms']} {v['rejected_p99_ms']} | {sum(r['errors'].values())} | {r['readyz_p99_ms']} "
            f"{v['readyz_p99_ms']} / {r.get('probe_port_readyz_p99_ms')} {v['probe_port_readyz_p99_ms']}"
            f"{control(r)} | "
            f"{r['recovery_s']} {v['recovery_s']} | {r['rss_before_mb']} → "
            f"{r['rss_after_mb']} ({100 * r['rss_growth_fraction']:+.0f} %) {v['rss_growth_fraction']} | "
            f"{r['generator_late_p99_ms']} | {cores(r)} | {lag_cell(r)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=30.0, help="length of the burst")
    parser.add_argument("--factor", type=float, default=2.0, help="offered load as a multiple of capacity")
    parser.add_argument("--rate", type=float, help="offered requests/s, in place of --factor x capacity (the same "
                                                   "load for A/B runs, whatever the capacity run measured)")
    parser.add_argument("--doors", nargs="+", default=["http", "grpc"], choices=["http", "grpc"])
    parser.add_argument("--connections", type=int, default=1024,
                        help="HTTP keep-alive connections of the burst at most (a request due while all are busy "
                             "waits for one; its latency counts from when it was due)")
    parser.add_argument("--json", action="store_true", help="HTTP: OIP REST JSON tensors instead of binary")
    parser.add_argument("--generator", choices=sorted(GENERATORS), default="native",
                        help="the burst's generator: native (benchmarks/native/openloop.c, built on first use; "
                             "needs gcc and libnghttp2-dev) or python (benchmarks/loadgen.py; heavier: 30 us (HTTP) "
                             "and 140 us (gRPC) of CPU per request on the server's cores)")
    parser.add_argument("--results-name", default="overload", help="stem of the results files")
    args = parser.parse_args()
    rows = []
    for kind in args.doors:  # a fresh service per door: memory and counters start the same
        with tempfile.TemporaryDirectory() as tmp, control_probe_port(Path(tmp)) as control_port:
            service = Service.start(Path(tmp) / "server.log")
            try:
                rows.append(asyncio.run(measure(kind, service, control_port, args.seconds, args.factor,
                                                args.connections, args.rate, not args.json, args.generator)))
            finally:
                service.stop()
    print(write_results(args.results_name, {"goals": GOALS, "rows": rows, "seconds": args.seconds,
                                            "factor": args.factor}, markdown(rows, args)))


if __name__ == "__main__":
    main()
