"""Shutdown under load: what clients sending through a SIGTERM get.

    python -m benchmarks.shutdown [--runs 3] [--clients 4] [--drain-s 3]

Per run: the service as ``make serve`` starts it (2 workers), ``--clients`` keep-alive HTTP clients each sending
4-image OIP binary requests back to back; SIGTERM to the server (as Kubernetes sends it) after 1.5 s; the clients
keep sending until it has exited. Outcomes per run: answered (200), refused before sending (connection refused:
the request never left the client, safe to retry elsewhere), and failures after sending (reset, closed without
an answer: the client cannot tell whether the request ran). Goal from the issue: no failure after sending.
Writes benchmarks/results/shutdown.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks.loadgen import Service, command
from benchmarks.publish import write_results

IMAGES = 4


def one_run(clients: int, drain_s: float) -> dict[str, int]:
    header = json.dumps({"inputs": [{"name": "images", "shape": [IMAGES, 28, 28], "datatype": "UINT8",
                                     "parameters": {"binary_data_size": IMAGES * 784}}]}).encode()
    body, headers = header + bytes(IMAGES * 784), {"Inference-Header-Content-Length": str(len(header))}
    outcomes: collections.Counter[str] = collections.Counter()
    lock, stop = threading.Lock(), threading.Event()
    with tempfile.TemporaryDirectory() as tmp:
        service = Service.start(Path(tmp) / "server.log", shutdown_drain_s=drain_s)
        url = f"{service.url}/v2/models/mnist-cnn/infer"

        def client() -> None:
            with httpx.Client(timeout=10) as session:
                while not stop.is_set():
                    try:
                        outcome = str(session.post(url, content=body, headers=headers).status_code)
                    except httpx.ConnectError:
                        outcome = "refused before sending"
                        time.sleep(0.05)
                    except httpx.HTTPError as exc:
                        outcome = f"failed after sending ({type(exc).__name__})"
                    with lock:
                        outcomes[outcome] += 1

        threads = [threading.Thread(target=client) for _ in range(clients)]
        for thread in threads:
            thread.start()
        try:
            time.sleep(1.5)
            os.kill(service.server.proc.pid, signal.SIGTERM)
            service.server.proc.wait(60)
            time.sleep(0.5)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
            service.stop()
    return dict(outcomes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--drain-s", type=float, default=3.0, help="CNNSERVE_SHUTDOWN_DRAIN_S of the server")
    parser.add_argument("--results-name", default="shutdown", help="stem of the results files")
    args = parser.parse_args()
    runs = []
    for run in range(args.runs):
        runs.append(one_run(args.clients, args.drain_s))
        print(f"run {run + 1}: {runs[-1]}", flush=True)
    failed = sum(n for r in runs for kind, n in r.items() if kind.startswith("failed"))
    lines = ["# Shutdown under load", "",
             f"`{command('benchmarks.shutdown')}`: {args.clients} keep-alive clients sending {IMAGES}-image OIP "
             f"binary requests back to back through a SIGTERM to the server (2 workers, drain {args.drain_s:g} s).",
             "", f"- failures after sending, all runs: {failed} (goal 0) {'✓' if failed == 0 else '✗'}", "",
             "| run | outcomes |", "|---|---|"]
    lines += [f"| {i + 1} | {', '.join(f'{n} {kind}' for kind, n in sorted(r.items()))} |" for i, r in enumerate(runs)]
    print(write_results(args.results_name, {"runs": runs, "failed_after_sending": failed, "clients": args.clients,
                                     "drain_s": args.drain_s}, "\n".join(lines) + "\n"))


if __name__ == "__main__":
    main()
