#!/usr/bin/env bash
# make container-test: build Dockerfile.serve, run it on 127.0.0.1 with a read-only root filesystem,
# wait for /readyz, check the probe port, classify over HTTP and gRPC, check the user is not root, report the size, clean up.
#
# Environment: those of lib.sh (CONTAINER_ENGINE, PIP_CA_FILE, KEEP_IMAGE), BASE_IMAGE (build arg),
# PYTHON (a Python with tritonclient[grpc] and pillow, default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/container/lib.sh
PYTHON=${PYTHON:-.venv/bin/python}
TAG=${IMAGE_TAG:-localhost/cnnserve-serve:container-test}
NAME=cnnserve-container-test-$$
HTTP_PORT=$($PYTHON -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
GRPC_PORT=$($PYTHON -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
PROBE_PORT=$($PYTHON -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')

build_args=(-f Dockerfile.serve)
[ -n "${BASE_IMAGE:-}" ] && build_args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")

cleanup() {
  $ENGINE rm -f "$NAME" >/dev/null 2>&1 || true
  remove_image "$TAG"
}
trap cleanup EXIT

start=$(date +%s)
build_image "$TAG" /tmp/cnnserve-container-build.log "${build_args[@]}"

echo "== run (read-only root filesystem, tmpfs on /tmp)"
$ENGINE run -d --name "$NAME" --read-only --tmpfs /tmp \
  -p "127.0.0.1:$HTTP_PORT:3000" -p "127.0.0.1:$GRPC_PORT:8001" -p "127.0.0.1:$PROBE_PORT:8002" "$TAG" >/dev/null
for _ in $(seq 1 120); do
  if curl -fsS "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null 2>&1; then break; fi
  sleep 1
done
curl -fsS "http://127.0.0.1:$HTTP_PORT/readyz" >/dev/null || { $ENGINE logs "$NAME" | tail -40; exit 1; }
echo "   ready after $(( $(date +%s) - start )) s since the build started"
# the probe port the image's HEALTHCHECK and the manifests use
curl -fsS "http://127.0.0.1:$PROBE_PORT/readyz" >/dev/null && curl -fsS "http://127.0.0.1:$PROBE_PORT/livez" >/dev/null \
  || { echo "the probe port (8002) does not answer"; exit 1; }

echo "== classify over HTTP and gRPC"
HTTP_PORT=$HTTP_PORT GRPC_PORT=$GRPC_PORT $PYTHON - <<'PY'
import io, os
import httpx, numpy as np, tritonclient.grpc as g
from PIL import Image, ImageDraw
image = Image.new("L", (28, 28))
ImageDraw.Draw(image).line([(14, 4), (14, 24)], fill=255, width=3)   # a "1"
buf = io.BytesIO(); image.save(buf, "PNG")
r = httpx.post(f"http://127.0.0.1:{os.environ['HTTP_PORT']}/classify", files=[("images", ("one.png", buf.getvalue(), "image/png"))],
               data={"model": "mnist-cnn", "top_k": "2"}, timeout=30)
r.raise_for_status(); print("   HTTP /classify:", r.json()["results"][0]["top_k"])
client = g.InferenceServerClient(f"127.0.0.1:{os.environ['GRPC_PORT']}")
x = np.asarray(image, dtype=np.uint8)[None]
inp = g.InferInput("images", list(x.shape), "UINT8"); inp.set_data_from_numpy(x)
probs = client.infer("mnist-cnn", [inp]).as_numpy("probs")[0]
print("   gRPC ModelInfer: argmax", int(probs.argmax()), "p", round(float(probs.max()), 4))
assert r.json()["results"][0]["top_k"][0]["index"] == int(probs.argmax())
PY

echo "== non-root and read-only root filesystem"
uid=$($ENGINE exec "$NAME" id -u)
[ "$uid" != 0 ] || { echo "runs as root"; exit 1; }
if $ENGINE exec "$NAME" touch /app/probe 2>/dev/null; then echo "root filesystem is writable"; exit 1; fi
echo "   uid $uid; writing to /app fails as it should"

echo "== image size: $(image_size_mb "$TAG") MB ($TAG)"
echo "container test passed in $(( $(date +%s) - start )) s"
