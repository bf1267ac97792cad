"""Test-split accuracy of our models beside the MedMNIST v2 baselines, for every dataset found locally.

    python -m benchmarks.accuracy --data-dir ../shared/data [--reuse] [--seeds retinamnist-cnn=3]

The shipped models (exports/) are re-evaluated as exported ONNX files; for the other local datasets
(RetinaMNIST, AdrenalMNIST3D) a model is trained with the same code and config files, exported to a
scratch repository and evaluated the same way. The table reports the config's own seed; ``--seeds
NAME=N`` also trains N-1 more seeds of a trained-here model and reports their spread (a test split of a
few hundred images moves by about a percentage point between seeds). For an ensemble config the seeds
step by its size, so that no two runs share a member.
Writes benchmarks/results/accuracy.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import statistics
import sys
from pathlib import Path

from benchmarks.publish import RESULTS, write_results
from training.config import TrainConfig
from training.data import DataNotFoundError, dataset_spec, load_split
from training.evaluate import evaluate_path
from training.export import export_checkpoint
from training.shipped import SHIPPED, ModelEntry, Targets
from training.train import CHECKPOINT, same_config, train

ROOT = Path(__file__).resolve().parents[1]

# MedMNIST v2 (Yang et al., Scientific Data 2023), Tables of test AUC / ACC; 2D: ResNet-18/50 at 28 and 224 px,
# 3D: ResNet-18/50 with 2.5D, 3D and ACS convolutions. Transcribed from the paper.
BASELINES = {
    "pneumoniamnist": {"ResNet-18 (28)": (0.944, 0.854), "ResNet-18 (224)": (0.956, 0.864),
                       "ResNet-50 (28)": (0.948, 0.854), "ResNet-50 (224)": (0.962, 0.884),
                       "auto-sklearn": (0.942, 0.855), "AutoKeras": (0.947, 0.878),
                       "Google AutoML Vision": (0.991, 0.946)},
    "retinamnist": {"ResNet-18 (28)": (0.717, 0.524), "ResNet-18 (224)": (0.710, 0.493),
                    "ResNet-50 (28)": (0.726, 0.528), "ResNet-50 (224)": (0.716, 0.511),
                    "auto-sklearn": (0.690, 0.515), "AutoKeras": (0.719, 0.503),
                    "Google AutoML Vision": (0.750, 0.531)},
    "adrenalmnist3d": {"ResNet-18 + 2.5D": (0.718, 0.772), "ResNet-18 + 3D": (0.827, 0.721),
                       "ResNet-18 + ACS": (0.839, 0.754), "ResNet-50 + 2.5D": (0.732, 0.763),
                       "ResNet-50 + 3D": (0.828, 0.745), "ResNet-50 + ACS": (0.828, 0.758),
                       "auto-sklearn": (0.828, 0.802), "AutoKeras": (0.804, 0.705)},
}
# benchmark-only models (the shipped ones and their targets: training.shipped); targets from the issue tracker
TRAINED_HERE = (ModelEntry("retinamnist-cnn", "retinamnist", Targets(acc=0.55, auc=0.76)),
                ModelEntry("adrenalmnist3d-cnn", "adrenalmnist3d", Targets(acc=0.80, auc=0.85)))
TARGETS = {m.name: m.targets for m in (*SHIPPED, *TRAINED_HERE)}


def available(flag: str, data_dir: Path) -> bool:
    try:
        load_split(dataset_spec(flag), "test", data_dir, download=False)
        return True
    except DataNotFoundError:
        return False


def latest_version(name: str) -> Path:
    return max((ROOT / "exports" / name).iterdir(), key=lambda p: int(p.name) if p.name.isdigit() else -1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "benchmark-accuracy",
                        help="run dirs and scratch model repository for the models trained here")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse finished runs in --work-dir whose config is unchanged")
    parser.add_argument("--seeds", action="append", default=[], metavar="NAME=N",
                        help=f"train N seeds of a trained-here model ({', '.join(m.name for m in TRAINED_HERE)}); "
                             "repeatable")
    parser.add_argument("--shipped-only", action="store_true",
                        help="evaluate the shipped models only; the trained-here rows are carried over from the "
                             "previous results (marked so), not re-trained")
    args = parser.parse_args()
    seeds = {}
    for item in args.seeds:
        name, _, n = item.partition("=")
        if name not in [m.name for m in TRAINED_HERE] or not n.isdigit() or int(n) < 1:
            parser.error(f"--seeds {item!r}: expected NAME=N with NAME one of {[m.name for m in TRAINED_HERE]}")
        seeds[name] = int(n)
    rows, spreads = [], []
    for name, flag in ((m.name, m.dataset) for m in SHIPPED):
        if available(flag, args.data_dir):
            path = latest_version(name)
            card = json.loads((path / "model.json").read_text())
            row = _row(name, flag, evaluate_path(path, "test", data_dir=args.data_dir, download=False),
                       f"exports/{name}/{path.name} ({card['training']['command']})", None)
            calibration = card.get("calibration")
            row["ece"] = calibration["test"]["after"]["ece"] if calibration else None
            rows.append(row)
    if args.shipped_only:
        previous = json.loads((RESULTS / "accuracy.json").read_text())
        note = f" (carried over from `{previous['command']}`)"
        carried = [r if "carried over" in r["source"] else dict(r, source=r["source"] + note)
                   for r in previous["rows"] if r["model"] in {m.name for m in TRAINED_HERE}]
        rows += carried
        spreads += previous["seed_spread"]
    for name, config in ((m.name, m.config) for m in TRAINED_HERE if not args.shipped_only):
        if not available(config, args.data_dir):
            continue
        cfg = TrainConfig.load(config)
        per_seed = []
        for offset in range(seeds.get(name, 1)):
            seed = cfg.seed + offset * cfg.ensemble
            run_name = name if offset == 0 else f"{name}-seed{seed}"
            _, measured, minutes = train_and_evaluate(
                TrainConfig.load(config, {"seed": seed}), args.work_dir / run_name, args.work_dir / "repo", run_name,
                f"python -m training train {config} --seed {seed}", args.data_dir, args.reuse)
            per_seed.append({"seed": seed, "acc": measured["acc"], "auc": measured["auc"]})
            if offset == 0:
                rows.append(_row(name, config, measured,
                                 f"python -m training train {config} (benchmark run, not shipped)", minutes))
        if len(per_seed) > 1:
            spreads.append({"model": name, "config": config, "ensemble": cfg.ensemble, "seeds": per_seed})
    command = shlex.join(["python", "-m", "benchmarks.accuracy", *sys.argv[1:]])
    print(write_results("accuracy", {"command": command, "rows": rows, "seed_spread": spreads},
                        render(rows, spreads, command)))


def train_and_evaluate(cfg: TrainConfig, run_dir: Path, repo: Path, name: str, command: str, data_dir: Path,
                       reuse: bool) -> tuple[Path, dict, float]:
    """Train ``cfg`` into ``run_dir`` (``reuse``: keep or resume a run of this very config), export it to the
    scratch repository ``repo`` as ``name`` and evaluate the ONNX on test; returns the version directory, the test
    metrics and the minutes of training epochs."""
    # reuse (or resume) only a run of this very config: a config edited since then means a new run
    reusable = reuse and same_config(run_dir, cfg)
    if not (reusable and (run_dir / "metrics.json").exists()):
        train(cfg, run_dir, data_dir, download=False, quiet=True, resume=reusable)
    with open(run_dir / "history.csv") as f:
        minutes = sum(float(row["epoch_s"]) for row in csv.DictReader(f)) / 60
    path = export_checkpoint(run_dir / CHECKPOINT, repo, name, data_dir, download=False, command=command)
    return path, evaluate_path(path, "test", data_dir=data_dir, download=False), minutes


def _row(name: str, flag: str, measured: dict, source: str, minutes: float | None) -> dict:
    targets = TARGETS[name]
    return {"model": name, "dataset": flag, "acc": measured["acc"], "auc": measured["auc"], "n": measured["n"],
            "target_acc": targets.acc, "target_auc": targets.auc, "target_met": targets.met(measured), "source": source,
            "train_minutes_cpu": minutes}


def render(rows: list[dict], spreads: list[dict], command: str) -> str:
    lines = ["# Test accuracy: cnnserve vs MedMNIST v2 baselines", "",
             f"Measured with `{command}` on the exported ONNX models (onnxruntime, CPU), official test splits.",
             "ACC and AUC as `medmnist.Evaluator` defines them (tests check equality).", "",
             "ECE: top-label, 15 bins, on test, of the model as exported (temperature-scaled on val; from its card).",
             "",
             "| model | dataset | n | ACC | AUC | ECE | target ACC / AUC | met | MedMNIST v2 ResNet with the best ACC "
             "(AUC / ACC) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = BASELINES.get(r["dataset"], {})
        resnets = {k: v for k, v in base.items() if k.startswith("ResNet")}
        best = max(resnets.items(), key=lambda kv: kv[1][1]) if resnets else None
        target = " / ".join("–" if t is None else f"{t:.3f}" for t in (r["target_acc"], r["target_auc"]))
        ece = "–" if r.get("ece") is None else f"{r['ece']:.4f}"
        lines.append(f"| {r['model']} | {r['dataset']} | {r['n']} | {r['acc']:.4f} | {r['auc']:.4f} | {ece} | "
                     f"{target} | "
                     f"{ {True: 'yes', False: 'NO', None: '–'}[r['target_met']]} | "
                     + (f"{best[0]}: {best[1][0]:.3f} / {best[1][1]:.3f}" if best else "–") + " |")
    for spread in spreads:
        accs, aucs = [s["acc"] for s in spread["seeds"]], [s["auc"] for s in spread["seeds"]]
        n = spread.get("ensemble", 1)
        members = f", each an ensemble of {n} (members: seeds N .. N+{n - 1})" if n > 1 else ""
        lines += ["", f"### {spread['model']} over {len(accs)} seeds (`python -m training train {spread['config']} "
                  f"--seed N`{members})", "", "| seed | ACC | AUC |", "|---|---|---|"]
        lines += [f"| {s['seed']} | {s['acc']:.4f} | {s['auc']:.4f} |" for s in spread["seeds"]]
        lines.append(f"| mean ± sd | {statistics.mean(accs):.4f} ± {statistics.stdev(accs):.4f} | "
                     f"{statistics.mean(aucs):.4f} ± {statistics.stdev(aucs):.4f} |")
        met = TARGETS[spread["model"]].met({"acc": statistics.mean(accs), "auc": statistics.mean(aucs)})
        lines += ["", f"Target met by the mean over seeds: { {True: 'yes', False: 'NO', None: '–'}[met]}."]
    lines += ["", "## MedMNIST v2 baselines (test AUC / ACC, from the paper)", ""]
    for flag, base in BASELINES.items():
        lines.append(f"- **{flag}**: " + "; ".join(f"{k} {auc:.3f} / {acc:.3f}" for k, (auc, acc) in base.items()))
    lines += ["", "## Where each number comes from", ""]
    for r in rows:
        minutes = r["train_minutes_cpu"]
        extra = f" — {minutes:.1f} min of training epochs on 2 CPU cores" if minutes else ""
        lines.append(f"- {r['model']}: {r['source']}{extra}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
