"""How HTTP keep-alive connections opened together spread over the service's workers.

    python -m benchmarks.connection_spread [--starts 5] [--connections 16]

Per fresh start of the service (as `make serve` runs it): ``--connections`` connections opened at once, closed-loop
OIP REST binary requests over them for 2 s, and after 1 s the established connections per worker process (``ss``
counts by pid). Writes benchmarks/results/connection_spread.{json,md}.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.loadgen import HttpLoad, Service, http_request, sample_images
from benchmarks.publish import write_results


async def spread(service: Service, connections: int) -> tuple[list[int], float]:
    """Connections per worker (largest first) while ``connections`` closed-loop clients run, and their images/s."""
    load = HttpLoad(service.http_port, http_request(service.http_port, True, sample_images()), "http", connections)
    running = asyncio.create_task(load.closed_loop(2))
    await asyncio.sleep(1)
    listing = subprocess.run(["ss", "-tnpH", "state", "established", f"( sport = :{service.http_port} )"],
                             capture_output=True, text=True, check=True).stdout
    per_pid = collections.Counter(re.findall(r"pid=(\d+)", listing))
    samples = await running
    return sorted(per_pid.values(), reverse=True), sum(s.outcome == "ok" for s in samples) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    rows = []
    for start in range(args.starts):
        with tempfile.TemporaryDirectory() as tmp:
            service = Service.start(Path(tmp) / "server.log")
            try:
                per_worker, rate = asyncio.run(spread(service, args.connections))
            finally:
                service.stop()
        rows.append({"start": start, "connections_per_worker": per_worker, "images_per_s": round(rate)})
        print(rows[-1], flush=True)
    command = shlex.join(["python", "-m", "benchmarks.connection_spread", *sys.argv[1:]])
    lines = ["# HTTP connections opened together, per worker", "", f"`{command}`: the service as `make serve` runs "
             f"it (2 workers), {args.connections} keep-alive connections opened at once, closed-loop OIP REST binary "
             "requests over them (the generator shares the 2 cores).", "",
             "| start | connections per worker | images/s |", "|---|---|---|"]
    lines += [f"| {r['start']} | {' / '.join(map(str, r['connections_per_worker']))} | {r['images_per_s']:,} |"
              for r in rows]
    print(write_results("connection_spread", {"command": command, "rows": rows}, "\n".join(lines) + "\n"))


if __name__ == "__main__":
    main()
