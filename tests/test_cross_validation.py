"""The cross-validation benchmark's folds: a stratified partition of the train split, loadable as a dataset."""

import torch

from benchmarks.cross_validation import write_folds
from training.data import dataset_spec, load_split


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
