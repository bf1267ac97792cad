"""Load test for cnnserve: single-image uploads to /classify and OIP JSON inference on /v2.

    locust -f tests/load/locustfile.py --headless -u 16 -r 4 -t 30s --host http://127.0.0.1:3000 --csv out

The k8s load-test Job mounts this file (kustomize reads only files below k8s/base); tests/load/locustfile.py
links here. Standard library + locust only, so it runs in the stock locust image.
"""

from __future__ import annotations

import io
import os
import random
import struct
import zlib

from locust import FastHttpUser, between, task

MODEL = os.environ.get("CNNSERVE_LOAD_MODEL", "mnist-cnn")
SIDE = int(os.environ.get("CNNSERVE_LOAD_SIDE", "28"))


def grey_png(pixels: bytes, side: int) -> bytes:
    """A minimal greyscale PNG, written by hand so the load generator needs no imaging library."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + pixels[r * side:(r + 1) * side] for r in range(side))
    out = io.BytesIO()
    out.write(b"\x89PNG\r\n\x1a\n")
    out.write(chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)))
    out.write(chunk(b"IDAT", zlib.compress(rows)))
    out.write(chunk(b"IEND", b""))
    return out.getvalue()


class ClassifyUser(FastHttpUser):
    wait_time = between(0, 0.01)

    def on_start(self) -> None:
        rng = random.Random(0)
        self.images = [bytes(rng.randrange(256) for _ in range(SIDE * SIDE)) for _ in range(16)]
        self.pngs = [grey_png(img, SIDE) for img in self.images]

    @task(1)
    def classify_upload(self) -> None:
        body = random.choice(self.pngs)
        self.client.post("/classify", files={"images": ("digit.png", body, "image/png")},
                         data={"model": MODEL}, name="/classify")

    @task(3)
    def oip_json(self) -> None:
        pixels = list(random.choice(self.images))
        payload = {"inputs": [{"name": "images", "shape": [1, SIDE, SIDE], "datatype": "UINT8", "data": pixels}]}
        self.client.post(f"/v2/models/{MODEL}/infer", json=payload, name="/v2/models/[model]/infer")
