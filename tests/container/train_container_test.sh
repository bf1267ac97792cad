#!/usr/bin/env bash
# make train-container-test: build Dockerfile.train as a CPU image on a plain Python base, run a short
# MNIST training job in it the way the Kubernetes Job does (data read-only on /data, model repository on
# /models, non-root, read-only root filesystem), check that it published a model with a card, report the
# image size, clean up.
#
# Environment: those of lib.sh (CONTAINER_ENGINE, PIP_CA_FILE, KEEP_IMAGE), BASE_IMAGE (default
# python:3.11-slim), TORCH_PACKAGES (pip arguments for torch + torchvision; default the CPU wheels from
# PyTorch's index), DATA_DIR (MNIST/raw/*.gz; default ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/../.."
source tests/container/lib.sh
TAG=${IMAGE_TAG:-localhost/cnnserve-train:container-test}
DATA_DIR=$(realpath "${DATA_DIR:-../shared/data}")
TORCH_PACKAGES=${TORCH_PACKAGES:-torch torchvision --index-url https://download.pytorch.org/whl/cpu}
models=$(mktemp -d)
chmod 777 "$models"   # the job runs as uid 10001

cleanup() {
  rm -rf "$models"
  remove_image "$TAG"
}
trap cleanup EXIT

start=$(date +%s)
build_image "$TAG" /tmp/cnnserve-train-build.log -f Dockerfile.train \
  --build-arg "BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim}" --build-arg "TORCH_PACKAGES=$TORCH_PACKAGES"

echo "== train + export mnist-fast (1 epoch, 6000 images) as the Job would, read-only root, no network"
$ENGINE run --rm --read-only --tmpfs /tmp --network none \
  -v "$DATA_DIR:/data:ro" -v "$models:/models" "$TAG" \
  train mnist-fast --epochs 1 --set train_limit=6000 --no-download --quiet --export
card=$(ls "$models"/mnist-fast/1/model.json)
python3 - "$card" <<'PY'
import json, sys
card = json.load(open(sys.argv[1]))
acc = card["metrics"]["test"]["acc"]
print(f"   published {card['name']}/{card['version']}: test acc {acc:.4f} on {card['dataset']['splits']['test']} images")
assert acc > 0.9, acc
PY
[ -f "$models/runs/mnist-fast/metrics.json" ] && echo "   run directory on /models/runs/mnist-fast"
uid=$($ENGINE run --rm --entrypoint id "$TAG" -u)
[ "$uid" != 0 ] || { echo "the job runs as root"; exit 1; }
echo "   uid $uid"

echo "== image size: $(image_size_mb "$TAG") MB ($TAG)"
echo "train container test passed in $(( $(date +%s) - start )) s"
