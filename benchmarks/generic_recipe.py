"""Test scores of the generic training recipe (training/recipes.py) over seeds, for every MedMNIST dataset found
locally, beside the tuned config and the MedMNIST v2 ResNet-18 baseline.

    python -m benchmarks.generic_recipe --data-dir ../shared/data --seeds 3 [--reuse] [--datasets FLAG ...]

Seed K of a dataset trains ``derive_config(FLAG)`` (what ``python -m training train FLAG`` trains when there is
no YAML of that name) into runs/benchmark-generic/FLAG/seed-K, exports it to a scratch model repository and
evaluates the exported ONNX on the test split, as benchmarks/accuracy.py does. The ECE is the card's, after
temperature scaling on val. The tuned config's scores come from benchmarks/results/accuracy.json.
Writes benchmarks/results/generic_recipe.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
from pathlib import Path

from benchmarks.accuracy import BASELINES, latest_version, train_and_evaluate
from benchmarks.publish import RESULTS, write_results
from training.data import dataset_spec, is_local, medmnist_flags
from training.recipes import derive_config
from training.shipped import SHIPPED_NAMES

ROOT = Path(__file__).resolve().parents[1]
BASELINE = {False: "ResNet-18 (28)", True: "ResNet-18 + 3D"}  # the MedMNIST v2 model to beat, by is_3d
RECIPE_KEYS = ("widths", "dropout", "optimizer", "lr", "weight_decay", "schedule", "label_smoothing", "augment", "ema",
               "select")  # the settings the md shows (epochs and batch are in the table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "benchmark-generic",
                        help="run dirs and scratch model repository")
    parser.add_argument("--datasets", nargs="+", choices=medmnist_flags(), metavar="FLAG",
                        help="default: every MedMNIST dataset whose 28-pixel file is in --data-dir")
    parser.add_argument("--seeds", action="append", default=[], metavar="N or FLAG=N",
                        help="seeds 0..N-1 per dataset (default 3); FLAG=N for one dataset; repeatable")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse finished runs in --work-dir whose config is unchanged")
    args = parser.parse_args()
    flags = args.datasets or [f for f in medmnist_flags() if is_local(f, 28, args.data_dir)]
    if not flags:
        parser.error(f"no MedMNIST dataset in {args.data_dir}")
    default_seeds, seeds = 3, {}
    for item in args.seeds:
        flag, _, n = item.rpartition("=")
        if not n.isdigit() or int(n) < 1 or (flag and flag not in flags):
            parser.error(f"--seeds {item!r}: expected N or FLAG=N with N >= 1 and FLAG one of {flags}")
        if flag:
            seeds[flag] = int(n)
        else:
            default_seeds = int(n)
    command = shlex.join(["python", "-m", "benchmarks.generic_recipe", *sys.argv[1:]])
    rows = [run_dataset(flag, seeds.get(flag, default_seeds), args, command) for flag in flags]
    print(write_results("generic_recipe", {"command": command, "rows": rows}, render(rows, command)))


def run_dataset(flag: str, n_seeds: int, args: argparse.Namespace, command: str) -> dict:
    """Train, export and evaluate seeds 0..n_seeds-1 of the recipe for ``flag``; summarise them."""
    recipe = derive_config(flag)
    per_seed = []
    for seed in range(n_seeds):
        path, measured, _ = train_and_evaluate(
            dataclasses.replace(recipe, seed=seed), args.work_dir / flag / f"seed-{seed}", args.work_dir / "repo",
            f"{flag}-seed{seed}", f"{command} (derive_config({flag!r}), seed {seed})", args.data_dir, args.reuse)
        per_seed.append({"seed": seed, "acc": measured["acc"], "auc": measured["auc"], "ece": _ece(path)})
    mean = {k: statistics.mean(s[k] for s in per_seed) for k in ("acc", "auc", "ece")}
    sd = {k: statistics.stdev(s[k] for s in per_seed) if n_seeds > 1 else None for k in ("acc", "auc", "ece")}
    baseline = BASELINE[dataset_spec(flag).is_3d]
    auc, acc = BASELINES.get(flag, {}).get(baseline, (None, None))
    return {"dataset": flag, "config": recipe.to_dict(), "seeds": per_seed, "mean": mean, "sd": sd,
            "baseline": {"model": baseline, "acc": acc, "auc": auc},
            "target_met": None if acc is None else mean["acc"] >= acc and mean["auc"] >= auc,
            "tuned": tuned_scores(flag)}


def tuned_scores(flag: str) -> dict | None:
    """The tuned ``FLAG-cnn`` config's test scores from benchmarks/results/accuracy.json (mean ± sd where it has
    several seeds), with the shipped model's calibrated ECE where there is one; None if it has no row."""
    name, published = f"{flag}-cnn", json.loads((RESULTS / "accuracy.json").read_text())
    row = next((r for r in published["rows"] if r["model"] == name), None)
    if row is None:
        return None
    spread = next((s for s in published["seed_spread"] if s["model"] == name), {"seeds": [row]})
    scores = spread["seeds"]
    return {"model": name, "source": row["source"], "n_seeds": len(scores), "ensemble": spread.get("ensemble", 1),
            **{k: statistics.mean(s[k] for s in scores) for k in ("acc", "auc")},
            **{f"{k}_sd": statistics.stdev(s[k] for s in scores) if len(scores) > 1 else None for k in ("acc", "auc")},
            **_shipped_ece(name)}


def _shipped_ece(name: str) -> dict:
    """The calibrated test ECE of the shipped model ``name``'s latest version (None if not shipped)."""
    if name not in SHIPPED_NAMES:
        return {"ece": None, "ece_source": None}
    path = latest_version(name)
    return {"ece": _ece(path), "ece_source": str(path.relative_to(ROOT))}


def _ece(version_dir: Path) -> float:
    """Test ECE after temperature scaling, from the model card."""
    return json.loads((version_dir / "model.json").read_text())["calibration"]["test"]["after"]["ece"]


def _pm(mean: float | None, sd: float | None) -> str:
    return "–" if mean is None else f"{mean:.4f}" + ("" if sd is None else f" ± {sd:.4f}")


def render(rows: list[dict], command: str) -> str:
    lines = ["# Generic training recipe vs tuned configs and MedMNIST v2", "",
             f"Measured with `{command}`: per dataset, `training.recipes.derive_config(FLAG)` trained with seeds "
             "0..N-1, exported, and the ONNX model evaluated on the official test split (onnxruntime, CPU). "
             "`derive_config` is what `python -m training train FLAG` trains for a flag without a YAML in "
             "`training/configs/`; the datasets here all have one (the tuned config), so the benchmark calls "
             "`derive_config` itself. ECE: test, after temperature scaling on val (model card).", "",
             "**Not held out on pneumoniamnist and adrenalmnist3d.** The recipe's settings were taken from the tuned "
             "`pneumoniamnist.yaml` (2D) and `adrenalmnist3d.yaml` (3D); only the training length and batch are "
             "derived from the dataset. Selecting the settings by leave-one-dataset-out cross-validation (issue 16) "
             "is still to do.", "",
             "Target: the recipe's mean over seeds ≥ the MedMNIST v2 ResNet-18 baseline in both ACC and AUC.", "",
             "| dataset | epochs, batch | seeds | ACC | AUC | ECE | baseline ACC / AUC | met "
             "| tuned config ACC / AUC |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base, tuned, cfg = r["baseline"], r["tuned"], r["config"]
        tuned_cell = (f"{_pm(tuned['acc'], tuned['acc_sd'])} / {_pm(tuned['auc'], tuned['auc_sd'])} "
                      f"({tuned['n_seeds']} seed{'s' if tuned['n_seeds'] > 1 else ''})") if tuned else "–"
        base_cell = f"{base['model']}: {base['acc']:.3f} / {base['auc']:.3f}" if base["acc"] is not None else "–"
        lines.append(f"| {r['dataset']} | {cfg['epochs']}, {cfg['batch_size']} | {len(r['seeds'])} | "
                     f"{_pm(r['mean']['acc'], r['sd']['acc'])} | {_pm(r['mean']['auc'], r['sd']['auc'])} | "
                     f"{_pm(r['mean']['ece'], r['sd']['ece'])} | {base_cell} | "
                     f"{ {True: 'yes', False: 'NO', None: '–'}[r['target_met']]} | {tuned_cell} |")
    most = max(len(r["seeds"]) for r in rows)
    for r in rows:
        if len(r["seeds"]) < most:
            lines += ["", f"{r['dataset']}: {len(r['seeds'])} seed(s) only, fewer than the other datasets."]
    for r in rows:
        lines += ["", f"### {r['dataset']}", "", "| seed | ACC | AUC | ECE |", "|---|---|---|---|"]
        lines += [f"| {s['seed']} | {s['acc']:.4f} | {s['auc']:.4f} | {s['ece']:.4f} |" for s in r["seeds"]]
        lines += ["", f"Recipe: `{json.dumps({k: r['config'][k] for k in RECIPE_KEYS})}`."]
        if tuned := r["tuned"]:
            ensemble = f", each an ensemble of {tuned['ensemble']}" if tuned["ensemble"] > 1 else ""
            ece = (f"; calibrated test ECE {tuned['ece']:.4f} ({tuned['ece_source']}'s card)"
                   if tuned["ece"] is not None else "")
            lines.append(f"Tuned config ({tuned['model']}): {tuned['source']}{ensemble}; ACC / AUC from "
                         f"benchmarks/results/accuracy.md{ece}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
