"""The cross-validation experiment: folds that partition the train split (stratified, loadable as a dataset),
and the summary of variants and their mixes."""

import pytest
import torch

from experiments.cross_validation import summarise, write_folds
from training.data import dataset_spec, load_split
from training.evaluate import headline_metrics


def test_folds_partition_the_train_split_and_keep_the_official_val(fixture_data, tmp_path):
    spec = dataset_spec("retinamnist")
    train, val = (load_split(spec, s, fixture_data, download=False) for s in ("train", "val"))
    dirs = write_folds("retinamnist", fixture_data, 3, tmp_path)
    held_out = [load_split(spec, "test", d, download=False) for d in dirs]
    official = {bytes(x.numpy()) for x in train.images}
    assert sum(len(h) for h in held_out) == len(train)
    for d, held in zip(dirs, held_out, strict=True):
        fold_train = load_split(spec, "train", d, download=False)
        assert len(fold_train) + len(held) == len(train)
        assert torch.equal(load_split(spec, "val", d, download=False).images, val.images)
        # every held-out image comes from the train split, and none is also trained on
        train_rows = {bytes(x.numpy()) for x in fold_train.images}
        assert all(bytes(x.numpy()) in official and bytes(x.numpy()) not in train_rows for x in held.images)
    counts = torch.stack([torch.bincount(h.labels, minlength=5) for h in held_out])
    assert (counts.max(0).values - counts.min(0).values).max() <= 1  # stratified


def test_a_mix_ensembles_every_seed_of_its_variants():
    task, seeds, labels = "multi-class", [0, 1], torch.tensor([0, 1, 2, 0, 1, 2])
    gen = torch.Generator().manual_seed(0)
    results = [{"variant": v, "seed": s, "fold": 0, "labels": labels, "probs": torch.rand(6, 3, generator=gen)}
               for v in ("a", "b") for s in seeds]
    rows = summarise(task, results, {"a": {}, "b": {"highpass": None}}, {"ab": ["a", "b"]}, 1, seeds)
    assert [(r["variant"], r["members"]) for r in rows] == [("a", 2), ("b", 2), ("ab", 4)]
    mean = sum(r["probs"] for r in results) / 4
    assert rows[2]["ensemble"]["auc"] == pytest.approx(headline_metrics(task, mean, labels)["auc"])
    singles = [headline_metrics(task, r["probs"], labels)["acc"] for r in results]
    assert rows[2]["single"]["acc"] == pytest.approx(sum(singles) / 4)
