"""The CUDA paths of the training job, checked end to end on a GPU machine.

    python -m device_checks.gpu_check --data-dir DIR [--out device_checks/results]

Each step is a real ``python -m training`` command (so the same code a cluster Job runs): the shipped
pipeline (train, evaluate, export with the ORT parity check) on CUDA with bf16 autocast and channels-last,
the same MNIST run under ``torch.compile``, the 3D and ImageNet-backbone models, and the training tests.
Results are written after every step to ``gpu_check.{json,md}``, so a run cut short keeps what it did.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.publish import write_results
from training.shipped import SHIPPED_NAMES

ROOT = Path(__file__).resolve().parents[1]

RESULTS = Path(__file__).resolve().parent / "results"
TRAIN = [sys.executable, "-m", "training"]


def steps(data: str, work: Path) -> list[tuple[str, list[str], Path | None]]:
    """(name, command, run dir whose metrics.json/history.csv to read)."""
    runs, models = work / "runs", work / "models"
    common = ["--data-dir", data, "--no-download", "--device", "cuda"]
    return [
        (f"pipeline ({', '.join(SHIPPED_NAMES)}; export + parity)",
         [*TRAIN, "pipeline", *common, "--runs-dir", str(runs), "--model-dir", str(models), "--quiet"], None),
        ("mnist-fast, bf16 autocast + channels-last",
         [*TRAIN, "train", "mnist-fast", *common, "--run-dir", str(runs / "fast"),
          "--overwrite", "--quiet"], runs / "fast"),
        ("mnist-fast, torch.compile",
         [*TRAIN, "train", "mnist-fast", *common, "--run-dir", str(runs / "fast-compiled"), "--set", "compile=true",
          "--overwrite", "--quiet"], runs / "fast-compiled"),
        ("adrenalmnist3d (Conv3d, bf16)",
         [*TRAIN, "train", "adrenalmnist3d", *common, "--run-dir", str(runs / "adrenal"),
          "--overwrite", "--quiet"], runs / "adrenal"),
        ("retinamnist",
         [*TRAIN, "train", "retinamnist", *common, "--run-dir", str(runs / "retina"),
          "--overwrite", "--quiet"], runs / "retina"),
        ("resnet18 transfer, random init (no weights offline), 64 px, 3 epochs",
         [*TRAIN, "train", "pneumoniamnist-transfer", *common, "--run-dir", str(runs / "resnet18"), "--epochs", "3",
          "--set", "pretrained=false", "--set", "head_epochs=1", "--overwrite", "--quiet"], runs / "resnet18"),
        ("training tests (pytest, CUDA visible)",
         [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "tests/test_models.py",
          "tests/test_train.py", "tests/test_export.py", "tests/test_metrics.py", "tests/test_data.py"], None),
    ]


def summarise(run_dir: Path | None) -> dict:
    if run_dir is None or not (run_dir / "metrics.json").exists():
        return {}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    with open(run_dir / "history.csv") as f:
        history = list(csv.DictReader(f))
    return {"test_acc": metrics["acc"], "test_auc": metrics["auc"], "epochs": len(history),
            "train_s": sum(float(r["epoch_s"]) for r in history),
            "img_per_s_last_epoch": float(history[-1]["img_per_s"])}


def environment() -> dict:
    import torch

    env = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        env["ort_providers"] = ort.get_available_providers()
    except ImportError:
        env["onnxruntime"] = None
    return env


def write(out: Path, results: dict) -> None:
    lines = ["# GPU check: the training job's CUDA paths", "",
             f"Command: `{results['command']}`", "", f"Environment: `{json.dumps(results['environment'])}`", "",
             "| step | exit | wall s | test ACC | test AUC | train s | img/s (last epoch) |",
             "|---|---|---|---|---|---|---|"]
    for s in results["steps"]:
        r = s["result"]
        cells = [f"{r[k]:.4f}" if k in r else "–" for k in ("test_acc", "test_auc")]
        cells += [f"{r['train_s']:.1f}" if r else "–", f"{r['img_per_s_last_epoch']:.0f}" if r else "–"]
        lines.append(f"| {s['name']} | {s['exit']} | {s['wall_s']:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Last lines of each step's output:", ""]
    for s in results["steps"]:
        lines += [f"### {s['name']}", "", "```", *s["tail"], "```", ""]
    write_results("gpu_check", results, "\n".join(lines), out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True, help="MNIST/raw/ and medmnist/<flag>.npz")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results go")
    parser.add_argument("--work", type=Path, default=Path("/tmp/cnnserve-gpu-check"), help="runs and models")
    parser.add_argument("--step-timeout", type=float, default=240, help="seconds per step")
    args = parser.parse_args()

    results = {"command": shlex.join(["python", "-m", "device_checks.gpu_check", *sys.argv[1:]]),
               "environment": environment(), "steps": []}
    for name, cmd, run_dir in steps(args.data_dir, args.work):
        print(f"== {name}: {shlex.join(cmd)}", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.step_timeout,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
            code, output = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            code, output = "timeout", (e.stdout or b"").decode() + (e.stderr or b"").decode()
        wall = time.perf_counter() - t0
        print(output[-3000:], flush=True)
        results["steps"].append({"name": name, "command": shlex.join(cmd), "exit": code, "wall_s": wall,
                                 "result": summarise(run_dir), "tail": output.strip().splitlines()[-12:]})
        write(args.out, results)


if __name__ == "__main__":
    main()
