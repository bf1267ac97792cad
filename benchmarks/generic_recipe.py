"""The generic training recipe (training/recipes.py): its settings chosen by leave-one-dataset-out
cross-validation over the MedMNIST datasets found locally, then scored on each held-out dataset's test split
beside the tuned config and the MedMNIST v2 ResNet-18 baseline.

    python -m benchmarks.generic_recipe --data-dir ../shared/data --seeds 3 --select-seeds 3 [--reuse] \\
        [--datasets FLAG ...]

Every candidate of ``training.recipes.CANDIDATES`` (settings laid over both recipes) is trained on every local
dataset with the selection seeds and scored there: (ACC + AUC) / 2 of the exported ONNX model on that dataset's
test split, mean over seeds. For each held-out dataset the candidate with the best mean score over the *other*
datasets is chosen (ties: the first in ``CANDIDATES``), trained with seeds 0..N-1 and evaluated on the held-out
dataset's test split; nothing of the held-out dataset plays a part in its choice. The other datasets are scored
on test, not val, because val is part of training: it picks the epoch, and a candidate that picks it by val
ACC would be flattered by its own val ACC. Seed K of a candidate
trains ``derive_config(FLAG, candidate=...)`` into runs/benchmark-generic/CANDIDATE/FLAG/seed-K, exports it to a
scratch model repository and evaluates the exported ONNX, as benchmarks/accuracy.py does. The ECE is the card's,
after temperature scaling on val. The tuned config's scores come from benchmarks/results/accuracy.json.
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
from training.evaluate import evaluate_path
from training.recipes import CANDIDATES, derive_config
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
                        help="seeds 0..N-1 of the chosen candidate per held-out dataset (default 3); FLAG=N for "
                             "one dataset; repeatable")
    parser.add_argument("--select-seeds", action="append", default=[], metavar="N or FLAG=N",
                        help="seeds 0..N-1 of every candidate, scored on the other datasets' test splits for the "
                             "selection (default 3, as many as the report: with 1 seed a choice can ride on one run)")
    parser.add_argument("--reuse", action="store_true",
                        help="reuse finished runs in --work-dir whose config is unchanged")
    args = parser.parse_args()
    flags = args.datasets or [f for f in medmnist_flags() if is_local(f, 28, args.data_dir)]
    if len(flags) < 2:
        parser.error(f"leave-one-dataset-out needs at least two MedMNIST datasets; found {flags} in {args.data_dir}")
    seeds = _per_flag(parser, "--seeds", args.seeds, flags, default=3)
    select_seeds = _per_flag(parser, "--select-seeds", args.select_seeds, flags, default=3)
    command = shlex.join(["python", "-m", "benchmarks.generic_recipe", *sys.argv[1:]])
    runs = Runs(args, command)
    # the selection: every candidate scored on every dataset
    scores = {c: {f: statistics.mean(_score(runs.get(c, f, seed)) for seed in range(select_seeds[f]))
                  for f in flags} for c in CANDIDATES}
    val_scores = {c: {f: statistics.mean(_score(runs.get(c, f, seed), "val_") for seed in range(select_seeds[f]))
                      for f in flags} for c in CANDIDATES}  # shown, not used
    rows = []
    for held_out in flags:
        chosen = choose(scores, [f for f in flags if f != held_out])
        rows.append(report_held_out(held_out, chosen, seeds[held_out], runs))
    report = {"command": command, "candidates": CANDIDATES, "select_seeds": select_seeds, "scores": scores,
              "val_scores": val_scores, "chosen_on_all": choose(scores, flags), "rows": rows}
    print(write_results("generic_recipe", report, render(report)))


def _per_flag(parser: argparse.ArgumentParser, option: str, items: list[str], flags: list[str],
              default: int) -> dict[str, int]:
    """``N`` or ``FLAG=N`` items -> seeds per flag."""
    per_flag = {}
    for item in items:
        flag, _, n = item.rpartition("=")
        if not n.isdigit() or int(n) < 1 or (flag and flag not in flags):
            parser.error(f"{option} {item!r}: expected N or FLAG=N with N >= 1 and FLAG one of {flags}")
        if flag:
            per_flag[flag] = int(n)
        else:
            default = int(n)
    return {f: per_flag.get(f, default) for f in flags}


class Runs:
    """Trains, exports and evaluates (candidate, dataset, seed) once; later asks reuse the result."""

    def __init__(self, args: argparse.Namespace, command: str) -> None:
        self.args, self.command, self.done = args, command, {}

    def get(self, candidate: str, flag: str, seed: int) -> dict:
        key = (candidate, flag, seed)
        if key not in self.done:
            cfg = dataclasses.replace(derive_config(flag, candidate=candidate), seed=seed)
            path, test, _ = train_and_evaluate(
                cfg, self.args.work_dir / candidate / flag / f"seed-{seed}", self.args.work_dir / "repo",
                f"{flag}-{candidate}-seed{seed}",
                f"{self.command} (derive_config({flag!r}, candidate={candidate!r}), seed {seed})",
                self.args.data_dir, self.args.reuse)
            val = evaluate_path(path, "val", data_dir=self.args.data_dir, download=False)
            self.done[key] = {"seed": seed, "val_acc": val["acc"], "val_auc": val["auc"], "acc": test["acc"],
                              "auc": test["auc"], "ece": _ece(path)}
            print(f"{candidate:14s} {flag:16s} seed {seed}: val ACC {val['acc']:.4f} AUC {val['auc']:.4f}  "
                  f"test ACC {test['acc']:.4f} AUC {test['auc']:.4f}", flush=True)
        return self.done[key]


def _score(run: dict, split: str = "") -> float:
    """(ACC + AUC) / 2 on test (``split`` "") or val ("val_")."""
    return (run[f"{split}acc"] + run[f"{split}auc"]) / 2


def choose(scores: dict[str, dict[str, float]], flags: list[str]) -> str:
    """The candidate with the best mean score over ``flags`` (ties: the first in CANDIDATES)."""
    return max(CANDIDATES, key=lambda c: statistics.mean(scores[c][f] for f in flags))


def report_held_out(flag: str, candidate: str, n_seeds: int, runs: Runs) -> dict:
    """Seeds 0..n_seeds-1 of ``candidate`` on ``flag``'s test split, summarised."""
    recipe = derive_config(flag, candidate=candidate)
    per_seed = [runs.get(candidate, flag, seed) for seed in range(n_seeds)]
    mean = {k: statistics.mean(s[k] for s in per_seed) for k in ("acc", "auc", "ece")}
    sd = {k: statistics.stdev(s[k] for s in per_seed) if n_seeds > 1 else None for k in ("acc", "auc", "ece")}
    baseline = BASELINE[dataset_spec(flag).is_3d]
    auc, acc = BASELINES.get(flag, {}).get(baseline, (None, None))
    return {"dataset": flag, "candidate": candidate, "config": recipe.to_dict(), "seeds": per_seed, "mean": mean,
            "sd": sd, "baseline": {"model": baseline, "acc": acc, "auc": auc},
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


def render(report: dict) -> str:
    rows, scores, flags = report["rows"], report["scores"], [r["dataset"] for r in report["rows"]]
    select_seeds = ", ".join(f"{f} {n}" for f, n in report["select_seeds"].items())
    lines = ["# Generic training recipe: chosen by leave-one-dataset-out, scored on the held-out dataset", "",
             f"Measured with `{report['command']}`.", "",
             "The recipe is what `python -m training train FLAG` trains for a flag without a YAML in "
             "`training/configs/` (`training.recipes.derive_config`): the architecture and optimiser settings of "
             "the 2D or 3D recipe, the training length and batch derived from the dataset's metadata. Its remaining "
             "settings were chosen among the candidates below **without the dataset each row reports on**: every "
             "candidate was trained on every local dataset (selection seeds: " + select_seeds + ") and scored "
             "there as (ACC + AUC) / 2 of the exported ONNX model on the test split, mean over seeds; for each "
             "held-out dataset the candidate with the best mean score over the *other* datasets was chosen, then "
             "trained with seeds 0..N-1 and evaluated on the held-out test split (onnxruntime, CPU). The other "
             "datasets are scored on test rather than val because val is part of training: it picks the epoch, "
             "and a candidate that picks it by val ACC is flattered by its own val ACC (the val columns below "
             "show it). ECE: test, after temperature scaling on val (model card).", "",
             "## Candidates and their scores (test; val in brackets, not used)", "",
             "| candidate | settings over the recipe | " + " | ".join(flags) + " |",
             "|---|---|" + "---|" * len(flags)]
    for name, overrides in report["candidates"].items():
        lines.append(f"| {name} | `{json.dumps(overrides) if overrides else 'as in the recipe'}` | "
                     + " | ".join(f"{scores[name][f]:.4f} (val {report['val_scores'][name][f]:.4f})" for f in flags)
                     + " |")
    lines += ["", "Chosen per held-out dataset: " + "; ".join(f"{r['dataset']} → **{r['candidate']}**" for r in rows)
              + f". Chosen on all datasets (what the recipes in `training/recipes.py` carry for the datasets we "
              f"cannot see): **{report['chosen_on_all']}**.", "",
              "## Held-out test scores", "",
              "Target: the recipe's mean over seeds ≥ the MedMNIST v2 ResNet-18 baseline in both ACC and AUC.", "",
              "| held-out dataset | chosen | epochs, batch | seeds | ACC | AUC | ECE | baseline ACC / AUC | met "
              "| tuned config ACC / AUC |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base, tuned, cfg = r["baseline"], r["tuned"], r["config"]
        tuned_cell = (f"{_pm(tuned['acc'], tuned['acc_sd'])} / {_pm(tuned['auc'], tuned['auc_sd'])} "
                      f"({tuned['n_seeds']} seed{'s' if tuned['n_seeds'] > 1 else ''})") if tuned else "–"
        base_cell = f"{base['model']}: {base['acc']:.3f} / {base['auc']:.3f}" if base["acc"] is not None else "–"
        lines.append(f"| {r['dataset']} | {r['candidate']} | {cfg['epochs']}, {cfg['batch_size']} | "
                     f"{len(r['seeds'])} | "
                     f"{_pm(r['mean']['acc'], r['sd']['acc'])} | {_pm(r['mean']['auc'], r['sd']['auc'])} | "
                     f"{_pm(r['mean']['ece'], r['sd']['ece'])} | {base_cell} | "
                     f"{ {True: 'yes', False: 'NO', None: '–'}[r['target_met']]} | {tuned_cell} |")
    for r in rows:
        lines += ["", f"### {r['dataset']} (held out; {r['candidate']})", "",
                  "| seed | val ACC | val AUC | test ACC | test AUC | test ECE |", "|---|---|---|---|---|---|"]
        lines += [f"| {s['seed']} | {s['val_acc']:.4f} | {s['val_auc']:.4f} | {s['acc']:.4f} | {s['auc']:.4f} | "
                  f"{s['ece']:.4f} |" for s in r["seeds"]]
        lines += ["", f"Config: `{json.dumps({k: r['config'][k] for k in RECIPE_KEYS})}`."]
        if tuned := r["tuned"]:
            ensemble = f", each an ensemble of {tuned['ensemble']}" if tuned["ensemble"] > 1 else ""
            ece = (f"; calibrated test ECE {tuned['ece']:.4f} ({tuned['ece_source']}'s card)"
                   if tuned["ece"] is not None else "")
            lines.append(f"Tuned config ({tuned['model']}): {tuned['source']}{ensemble}; ACC / AUC from "
                         f"benchmarks/results/accuracy.md{ece}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
