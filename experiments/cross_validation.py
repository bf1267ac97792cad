"""K-fold cross-validation of config variants on a dataset's official train split: choose a configuration
without looking at the test split.

    python -m experiments.cross_validation retinamnist --data-dir ../shared/data --seeds 5 --jobs 2 \\
        --variant "plain highpass=null" --variant highpass --mix "mixed=highpass+plain"

Each fold trains on the other folds of the train split (stratified), picks its epoch on the official val
split as every run does, and is scored on its held-out fold. The folds are written as medmnist npz files
into scratch data directories, so training runs through its ordinary entry point. Per variant the report
gives single models (mean over seeds and folds) and the ensemble of the seeds (mean probability), each as
the mean over folds; a ``--mix`` ensembles the seeds of several variants.
Writes experiments/results/<config>_cv.{json,md} (or --results-name).
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold

from benchmarks.publish import write_results
from serving.model_card import atomic_write
from training.config import TrainConfig, parse_override
from training.data import dataset_spec, load_split
from training.evaluate import headline_metrics

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def write_folds(flag: str, data_dir: Path, folds: int, work_dir: Path) -> list[Path]:
    """One data directory per fold: train = the other folds, val = the official val, test = this fold."""
    spec = dataset_spec(flag)
    train, val = (load_split(spec, s, data_dir, download=False) for s in ("train", "val"))
    labels = train.labels.numpy()
    splitter = (KFold(folds, shuffle=True, random_state=0) if labels.ndim > 1
                else StratifiedKFold(folds, shuffle=True, random_state=0))
    dirs = []
    for k, (keep, held) in enumerate(splitter.split(np.zeros(len(labels)), labels)):
        fold_dir = work_dir / f"fold{k}"
        (fold_dir / "medmnist").mkdir(parents=True, exist_ok=True)
        arrays = {"train": (train.images[keep], train.labels[keep]), "val": (val.images, val.labels),
                  "test": (train.images[held], train.labels[held])}
        with atomic_write(fold_dir / "medmnist" / f"{flag}.npz", "wb") as f:
            np.savez(f, **{
                f"{split}_{key}": value for split, (images, y) in arrays.items()
                for key, value in (("images", images.numpy()),
                                   ("labels", y.numpy().reshape(len(y), -1).astype(np.uint8)))
            })
        dirs.append(fold_dir)
    return dirs


def run_one(job: dict) -> dict:
    """Train one (variant, seed, fold) and return its held-out probabilities."""
    import torch

    from training.checkpoint import load_model
    from training.evaluate import predict_torch
    from training.train import CHECKPOINT, same_config, train

    torch.set_num_threads(job["threads"])
    cfg = TrainConfig.load(job["config"], {**job["overrides"], "seed": job["seed"], "ensemble": 1,
                                           "ensemble_variants": []})
    run_dir, fold_dir = Path(job["run_dir"]), Path(job["fold_dir"])
    if not (job["reuse"] and same_config(run_dir, cfg) and (run_dir / "metrics.json").exists()):
        train(cfg, run_dir, fold_dir, download=False, quiet=True, report=False)
    spec = dataset_spec(cfg.dataset, cfg.size)
    held_out = load_split(spec, "test", fold_dir, download=False)
    probs = predict_torch(load_model(run_dir / CHECKPOINT)[0], held_out.images, spec.task.startswith("multi-label"))
    return {**job, "probs": probs, "labels": held_out.labels}


def summarise(task: str, results: list[dict], variants: dict[str, dict], mixes: dict[str, list[str]], folds: int,
              seeds: list[int]) -> list[dict]:
    """One row per variant (its seeds' single models and their ensemble) and per mix (the ensemble of all
    seeds of several variants)."""
    probs = {(r["variant"], r["seed"], r["fold"]): r["probs"] for r in results}
    labels = {r["fold"]: r["labels"] for r in results}
    groups = {name: [name] for name in variants} | mixes
    rows = []
    for name, members in groups.items():
        per_seed = []  # mean over folds of each single model (variant, seed)
        for variant in members:
            for seed in seeds:
                scores = [headline_metrics(task, probs[variant, seed, k], labels[k]) for k in range(folds)]
                per_seed.append({m: statistics.mean(s[m] for s in scores) for m in ("acc", "auc")})
        ensemble = []
        for k in range(folds):
            mean = sum(probs[variant, seed, k] for variant in members for seed in seeds) / (len(members) * len(seeds))
            ensemble.append(headline_metrics(task, mean, labels[k]))
        overrides = variants[name] if name in variants else {"mix": "+".join(members)}
        rows.append({"variant": name, "overrides": overrides, "seeds": seeds, "members": len(per_seed),
                     "single": {m: statistics.mean(s[m] for s in per_seed) for m in ("acc", "auc")},
                     "single_sd_over_seeds": {m: statistics.stdev(s[m] for s in per_seed) if len(per_seed) > 1
                                              else 0.0 for m in ("acc", "auc")},
                     "ensemble": {m: statistics.mean(e[m] for e in ensemble) for m in ("acc", "auc")},
                     "per_seed": per_seed})
    return rows


def render(config: str, rows: list[dict], folds: int, command: str) -> str:
    n = len(rows[0]["seeds"])
    lines = [f"# {config}: {folds}-fold cross-validation on the train split", "",
             f"Measured with `{command}`.",
             f"Each fold trains on the other {folds - 1} folds (stratified), selects its epoch on the official val "
             "split and is scored on the held-out fold; the test split is not used. ACC / AUC as "
             "`medmnist.Evaluator` defines them, averaged over folds.", "",
             "| variant | overrides | single model ACC | single model AUC | ensemble | ensemble ACC | ensemble AUC |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        s, sd, e = r["single"], r["single_sd_over_seeds"], r["ensemble"]
        overrides = " ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "(the config's settings)"
        lines.append(f"| {r['variant']} | `{overrides}` | {s['acc']:.3f} ± {sd['acc']:.3f} | "
                     f"{s['auc']:.3f} ± {sd['auc']:.3f} | {r['members']} | {e['acc']:.3f} | {e['auc']:.3f} |")
    lines += ["", f"Single model: mean over the {n} seeds (and the variants of a mix) of the mean over folds, ± the "
              "standard deviation over those models. Ensemble: their probabilities averaged per image; a mix "
              "ensembles all seeds of its variants (an `ensemble_variants` config)."]
    return "\n".join(lines) + "\n"


def parse_variant(text: str) -> tuple[str, dict]:
    name, *overrides = text.split()
    parsed = dict(parse_override(o) for o in overrides)
    if {"ensemble", "ensemble_variants"} & set(parsed):
        raise SystemExit(f"--variant {text!r}: leave out ensemble settings; the ensemble of --seeds is reported "
                         "beside single models, and --mix ensembles several variants")
    return name, parsed


def parse_mix(text: str, variants: dict[str, dict]) -> tuple[str, list[str]]:
    name, _, members = text.partition("=")
    parts = members.split("+")
    unknown = [p for p in parts if p not in variants]
    if not members or unknown:
        raise SystemExit(f"--mix {text!r}: expected NAME=VARIANT+VARIANT[+...] of the --variant names "
                         f"{sorted(variants)}" + (f"; unknown: {unknown}" if unknown and members else ""))
    return name, parts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a config name in training/configs (a MedMNIST dataset)")
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--variant", action="append", default=[], metavar='"NAME [KEY=VALUE ...]"',
                        help="a name and config overrides; repeatable (default: the config as is)")
    parser.add_argument("--mix", action="append", default=[], metavar="NAME=VARIANT+VARIANT",
                        help="also report the ensemble of all seeds of these variants (as ensemble_variants "
                             "trains); repeatable")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant and fold (config seed + 0, 1, ...)")
    parser.add_argument("--jobs", type=int, default=2, help="trainings run at once (threads split between them)")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "runs" / "benchmark-cv")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs of the same config in --work-dir")
    parser.add_argument("--results-name", metavar="STEM",
                        help="write experiments/results/STEM.{json,md} (default: <config>_cv, the record of the "
                             "config's own choice; name side studies so they do not replace it)")
    args = parser.parse_args()

    variants = dict(parse_variant(v) for v in args.variant) if args.variant else {"config": {}}
    mixes = dict(parse_mix(m, variants) for m in args.mix)
    cfg = TrainConfig.load(args.config)
    fold_dirs = write_folds(cfg.dataset, args.data_dir, args.folds, args.work_dir / "data")
    seeds = [cfg.seed + i for i in range(args.seeds)]
    threads = max(1, (os.cpu_count() or 1) // args.jobs)
    jobs = [{"config": args.config, "variant": name, "overrides": overrides, "seed": seed, "fold": k,
             "fold_dir": str(fold_dir), "run_dir": str(args.work_dir / "runs" / f"{name}-seed{seed}-fold{k}"),
             "threads": threads, "reuse": args.reuse}
            for name, overrides in variants.items() for seed in seeds for k, fold_dir in enumerate(fold_dirs)]
    with ProcessPoolExecutor(args.jobs) as pool:
        results = []
        for i, result in enumerate(pool.map(run_one, jobs), 1):
            results.append(result)
            print(f"[{i}/{len(jobs)}] {result['variant']} seed {result['seed']} fold {result['fold']}", flush=True)
    rows = summarise(dataset_spec(cfg.dataset).task, results, variants, mixes, args.folds, seeds)
    command = shlex.join(["python", "-m", "experiments.cross_validation", *sys.argv[1:]])
    data = {"command": command, "folds": args.folds, "rows": rows}
    print(write_results(args.results_name or f"{args.config}_cv", data, render(args.config, rows, args.folds, command),
                        RESULTS))


if __name__ == "__main__":
    main()
