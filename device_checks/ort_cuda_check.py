"""onnxruntime's CUDA provider on the shipped models: does each load on the GPU, do its probabilities
match the CPU provider's on real test images, and how fast is it per batch size.

    python -m device_checks.ort_cuda_check --data-dir DIR [--model-dir exports] [--out device_checks/results]

Needs onnxruntime-gpu (the ``gpu`` extra) and a CUDA device. Writes ``ort_cuda_check.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from benchmarks.publish import write_results
from serving.model_card import INPUT_NAME, PROBS_NAME, read_card
from training.data import dataset_spec, load_split

ROOT = Path(__file__).resolve().parents[1]

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
BATCH_SIZES = (1, 8, 64, 512)


def images_per_second(session: ort.InferenceSession, images: np.ndarray, batch: int, seconds: float) -> dict:
    x = np.ascontiguousarray(images[:batch])
    for _ in range(5):
        session.run([PROBS_NAME], {INPUT_NAME: x})
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 10:
        t0 = time.perf_counter()
        session.run([PROBS_NAME], {INPUT_NAME: x})
        times.append(time.perf_counter() - t0)
    return {"batch": batch, "img_per_s": batch * len(times) / sum(times),
            "p50_ms": 1000 * statistics.median(times)}


def check_model(model_dir: Path, data_dir: Path, n_images: int, seconds: float) -> dict:
    card = read_card(model_dir / "model.json")
    spec = dataset_spec(card.dataset["name"], card.dataset.get("size", 28))
    images = load_split(spec, "test", data_dir, download=False).images[:n_images].numpy()
    cpu = ort.InferenceSession(str(model_dir / "model.onnx"), providers=[CPU])
    gpu = ort.InferenceSession(str(model_dir / "model.onnx"), providers=[CUDA, CPU])
    p_cpu = cpu.run([PROBS_NAME], {INPUT_NAME: images})[0]
    p_gpu = gpu.run([PROBS_NAME], {INPUT_NAME: images})[0]
    return {
        "model": f"{card.name}/{card.version}", "session_providers": gpu.get_providers(),
        "images": len(images), "max_abs_prob_diff": float(np.abs(p_cpu - p_gpu).max()),
        "argmax_agreement": float((p_cpu.argmax(1) == p_gpu.argmax(1)).mean()),
        "cpu": [images_per_second(cpu, images, b, seconds) for b in BATCH_SIZES],
        "cuda": [images_per_second(gpu, images, b, seconds) for b in BATCH_SIZES],
    }


def write(out: Path, results: dict) -> None:
    lines = ["# onnxruntime CUDA provider on the shipped models", "", f"Command: `{results['command']}`", "",
             f"Environment: `{json.dumps(results['environment'])}`", "",
             "| model | providers | images | max abs Δprob (CUDA vs CPU) | argmax agreement | "
             + " | ".join(f"CPU / CUDA img/s @{b}" for b in BATCH_SIZES) + " |",
             "|---|---|---|---|---|" + "---|" * len(BATCH_SIZES)]
    for m in results["models"]:
        speeds = [f"{c['img_per_s']:,.0f} / {g['img_per_s']:,.0f}" for c, g in zip(m["cpu"], m["cuda"], strict=True)]
        lines.append(f"| {m['model']} | {', '.join(m['session_providers'])} | {m['images']} | "
                     f"{m['max_abs_prob_diff']:.2e} | {m['argmax_agreement']:.4f} | " + " | ".join(speeds) + " |")
    write_results("ort_cuda_check", results, "\n".join(lines) + "\n", out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, required=True, help="MNIST/raw/ and medmnist/<flag>.npz")
    parser.add_argument("--model-dir", type=Path, default=ROOT / "exports", help="model repository")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                        help="where results go")
    parser.add_argument("--images", type=int, default=2048, help="test images for the parity check")
    parser.add_argument("--seconds", type=float, default=1.0, help="timing per batch size and provider")
    args = parser.parse_args()
    if hasattr(ort, "preload_dlls"):  # CUDA and cuDNN from the nvidia-* wheels, when that is where they are
        ort.preload_dlls()
    if CUDA not in ort.get_available_providers():
        sys.exit(f"error: onnxruntime {ort.__version__} has no CUDA provider ({ort.get_available_providers()}); "
                 "install onnxruntime-gpu")
    results = {"command": shlex.join(["python", "-m", "device_checks.ort_cuda_check", *sys.argv[1:]]),
               "environment": {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()},
               "models": []}
    for card_path in sorted(args.model_dir.glob("*/*/model.json")):
        print(f"== {card_path.parent}", flush=True)
        results["models"].append(check_model(card_path.parent, args.data_dir, args.images, args.seconds))
        print(json.dumps(results["models"][-1]), flush=True)
        write(args.out, results)


if __name__ == "__main__":
    main()
