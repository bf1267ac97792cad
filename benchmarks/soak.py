"""Soak benchmark: a long steady load below capacity over mixed doors, watched minute by minute.

    python -m benchmarks.soak [--minutes 10] [--fraction 0.7]

Capacity is measured first, door by door: 16 closed-loop clients for 10 s on each of OIP REST binary, OIP REST
JSON and gRPC, from the load generator of the run; the capacity of the even mix the soak offers is then 3 / (sum
of 1 / each door's capacity), since
a third of the load on each door costs a third of a second of each door's capacity per second. (16 clients
spread over the three doors at once overstated it: the cheaper HTTP doors answered more than their third, so a
soak at 70 % of that ran the gRPC door, the dearest, near its limit.) Then ``fraction`` x capacity, open loop,
split evenly over the three doors, for ``minutes``. Per minute: requests,
errors, p50 / p99 latency and the workers' RSS. Goals from the issue: 0 errors; RSS flat after warm-up
(<= 5 % growth over the last 8 minutes); each minute's p99 within 2x the first minute's.
The load comes from ``benchmarks/native/openloop.c`` (``--generator native``, the default: one process per door and
minute, a few microseconds of CPU per request; HTTP keep-alive connections, gRPC over 4 HTTP/2 connections) or from
the Python generators in this process (``--generator python``: 0.37 cores at 2,826 requests/s, on the cores the
server needs; with them the soak's p99 was 24-164 ms a minute, rising over the run, where a scratch run of the
native generator at 3,000 requests/s of binary and gRPC requests measured 4-8 ms, flat over 7 minutes).
Writes benchmarks/results/soak.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import psutil

from benchmarks.loadgen import (
    GrpcLoad,
    HttpLoad,
    NativeLoad,
    Sample,
    Service,
    collector_paused,
    command,
    http_request,
    percentile_ms,
    sample_images,
)
from benchmarks.publish import write_results

GOALS = {"errors": 0, "rss_growth_last_8_min": 0.05, "p99_vs_first_minute": 2.0}


def even_mix_capacity(door_capacities: Iterable[float]) -> float:
    """Requests/s of a load split evenly over doors of these capacities (each measured alone): a request on a door of
    capacity c takes 1 / c of the server's second, so n doors at r / n each fill it when r = n / sum(1 / c)."""
    capacities = list(door_capacities)
    if min(capacities) <= 0:
        raise ValueError(f"a door answered nothing in its capacity run ({capacities}): see the server log")
    return len(capacities) / sum(1 / c for c in capacities)


DOORS = ("http-binary", "http-json", "grpc")
HTTP_CONNECTIONS = 256  # per HTTP door in the soak: more than it ever has requests out


async def soak(service: Service, minutes: int, fraction: float, generator: str = "native") -> dict:
    images, http_port = sample_images(), service.http_port

    async def run(door: str, load: str, seconds: float, rate: float = 0.0) -> tuple[list[Sample], float]:
        """One door's samples under ``load`` ("closed": 16 closed-loop clients; "open": ``rate`` per second), and
        the CPU seconds of a native generator (0 for the Python ones, whose CPU is this process's)."""
        connections = 16 if load == "closed" else HTTP_CONNECTIONS
        if generator == "native":
            native = (NativeLoad("grpc", service.grpc_port, images, 4) if door == "grpc" else
                      NativeLoad("http", http_port, images, connections, binary=door == "http-binary"))
            start = native.closed_loop if load == "closed" else native.open_loop
            samples = await asyncio.to_thread(start, 16 if load == "closed" else rate, seconds)
            return samples, native.cpu_s
        if door == "grpc":
            grpc_load = GrpcLoad(service.grpc_port, images)
            if load == "closed":
                return await asyncio.to_thread(grpc_load.closed_loop, 16, seconds), 0.0
            return await asyncio.to_thread(grpc_load.open_loop, rate, seconds), 0.0
        http_load = HttpLoad(http_port, http_request(http_port, door == "http-binary", images), door, connections)
        return await (http_load.closed_loop(seconds) if load == "closed" else http_load.open_loop(rate, seconds)), 0.0

    async def alone(door: str, seconds: float) -> float:
        """Answers per second of 16 closed-loop clients on one door."""
        samples, _ = await run(door, "closed", seconds)
        return sum(s.outcome == "ok" for s in samples) / seconds

    doors = {}
    for door in DOORS:
        await alone(door, 2)
        doors[door] = await alone(door, 10)
    capacity = even_mix_capacity(doors.values())
    rate = fraction * capacity / 3  # per door
    rows, this_process = [], psutil.Process()
    for minute in range(1, minutes + 1):
        with collector_paused():
            server_cpu, own_cpu, start = service.server.cpu_seconds(), cpu_seconds(this_process), time.monotonic()
            parts = await asyncio.gather(*(run(door, "open", 60, rate) for door in DOORS))
            elapsed = time.monotonic() - start
            server_cores = round((service.server.cpu_seconds() - server_cpu) / elapsed, 2)
            native_cpu = sum(cpu for _, cpu in parts)
            generator_cores = round((cpu_seconds(this_process) - own_cpu + native_cpu) / elapsed, 2)
        samples: list[Sample] = [s for part, _ in parts for s in part]
        ok = [s.latency_s for s in samples if s.outcome == "ok"]
        kinds: dict[str, int] = {}
        for door, (part, _) in zip(DOORS, parts, strict=True):
            for s in part:
                if s.outcome != "ok":
                    kind = f"{door} {s.outcome}" + (f" ({s.reason})" if s.reason else "")
                    kinds[kind] = kinds.get(kind, 0) + 1
        rows.append({"minute": minute, "requests": len(samples), "errors": len(samples) - len(ok), "error_kinds": kinds,
                     "p50_ms": percentile_ms(ok, 50), "p99_ms": percentile_ms(ok, 99),
                     "rss_mb": round(service.worker_rss_mb(), 1),
                     "server_cores": server_cores, "generator_cores": generator_cores,
                     "generator_late_p99_ms": percentile_ms([s.sent_late_s for s in samples], 99)})
        print(rows[-1], flush=True)
    return {"capacity_per_s": round(capacity), "door_capacity_per_s": {d: round(c) for d, c in doors.items()},
            "offered_per_s": round(3 * rate), "minutes": rows}


def cpu_seconds(process: psutil.Process) -> float:
    return sum(process.cpu_times()[:2])


def summary(result: dict) -> dict:
    rows = result["minutes"]
    window = rows[-8:] if len(rows) >= 8 else rows
    return {"errors": sum(r["errors"] for r in rows),
            "rss_growth_last_8_min": round(window[-1]["rss_mb"] / window[0]["rss_mb"] - 1, 3),
            "p99_vs_first_minute": round(max(r["p99_ms"] for r in rows) / rows[0]["p99_ms"], 2)}


def markdown(result: dict, totals: dict, args: argparse.Namespace) -> str:
    met = {"errors": totals["errors"] <= GOALS["errors"],
           "rss": totals["rss_growth_last_8_min"] <= GOALS["rss_growth_last_8_min"],
           "p99": totals["p99_vs_first_minute"] <= GOALS["p99_vs_first_minute"]}
    lines = [
        "# Soak: steady load over mixed doors",
        "",
        f"`{command('benchmarks.soak')}`: the service as `make serve` runs it (2 workers, default settings unless "
        f"the command sets some), mnist-cnn, single images; capacity {result['capacity_per_s']}/s "
        "for an even mix of the three doors, from each door's alone (16 closed-loop clients, 10 s: "
        + ", ".join(f"{door} {c}/s" for door, c in result["door_capacity_per_s"].items())
        + f"; 3 / the sum of their inverses), offered "
        f"{result['offered_per_s']}/s open loop, split evenly "
        "over OIP REST binary, OIP REST JSON and gRPC; "
        + ("the load from `benchmarks/native/openloop.c`, a process per door and minute (HTTP: 256 keep-alive "
           "connections per door; gRPC: 4 HTTP/2 connections)" if args.generator == "native" else
           "the load from the Python generators (`benchmarks/loadgen.py`) in the benchmark's process")
        + "; the load generator shares the 2 cores (its CPU and the "
        "server's, in cores, are in the table: closed-loop clients batch more, so a fraction of their capacity "
        "costs the server more CPU than that fraction; *late*: how long after its due time the p99 request went "
        "out).",
        "",
        f"- errors: {totals['errors']} (goal 0) {'✓' if met['errors'] else '✗'}",
        f"- worker RSS growth over the last 8 minutes: {100 * totals['rss_growth_last_8_min']:+.1f} % (goal ≤ 5 %) "
        f"{'✓' if met['rss'] else '✗'}",
        f"- worst minute's p99 / first minute's: {totals['p99_vs_first_minute']} (goal ≤ 2) "
        f"{'✓' if met['p99'] else '✗'}",
        "",
        "| minute | requests | errors | p50 ms | p99 ms | worker RSS MB | server / generator cores | late p99 ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [f"| {r['minute']} | {r['requests']} | {r['errors']} {kinds_text(r)}| {r['p50_ms']} | {r['p99_ms']} | "
              f"{r['rss_mb']} | {r['server_cores']} / {r['generator_cores']} | {r['generator_late_p99_ms']} |"
              for r in result["minutes"]]
    return "\n".join(lines) + "\n"


def kinds_text(row: dict) -> str:
    kinds = row.get("error_kinds") or {}
    return "(" + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items())) + ") " if kinds else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=int, default=10)
    parser.add_argument("--fraction", type=float, default=0.7, help="offered load as a fraction of capacity")
    parser.add_argument("--generator", choices=["native", "python"], default="native",
                        help="the load's generator: native (benchmarks/native/openloop.c, built on first use; needs "
                             "gcc and libnghttp2-dev) or python (benchmarks/loadgen.py, in this process; heavier)")
    parser.add_argument("--results-name", default="soak", help="stem of the results files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        service = Service.start(Path(tmp) / "server.log")
        try:
            result = asyncio.run(soak(service, args.minutes, args.fraction, args.generator))
        finally:
            service.stop()
    totals = summary(result)
    print(write_results(args.results_name, {"goals": GOALS, "summary": totals, **result},
                        markdown(result, totals, args)))


if __name__ == "__main__":
    main()
