import shutil
from pathlib import Path

import medmnist
import numpy as np
import pytest
import torch

from training.data import (
    Batches,
    DataCorruptError,
    DataNotFoundError,
    Split,
    dataset_spec,
    load_split,
    medmnist_flags,
)


def test_all_18_medmnist_flags_have_specs_at_every_size():
    flags = medmnist_flags()
    assert len(flags) == 18
    assert sum(dataset_spec(f).is_3d for f in flags) == 6
    for flag in flags:
        cls = getattr(medmnist, medmnist.INFO[flag]["python_class"])
        for size in cls.available_sizes:
            spec = dataset_spec(flag, size)
            assert spec.size == size and spec.num_outputs == len(medmnist.INFO[flag]["label"])
    assert dataset_spec("chestmnist").num_outputs == 14
    assert dataset_spec("retinamnist").layout == "NHWC"
    assert dataset_spec("organmnist3d", 64).image_shape == (64, 64, 64)


def test_unknown_dataset_and_size_are_clear_errors():
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        dataset_spec("nope")
    with pytest.raises(ValueError, match="available at sizes"):
        dataset_spec("organmnist3d", 128)


@pytest.mark.parametrize("flag,shape", [
    ("pneumoniamnist", (28, 28)), ("retinamnist", (28, 28, 3)), ("organmnist3d", (28, 28, 28)),
])
def test_medmnist_splits_load_as_uint8_in_dataset_layout(fixture_data, flag, shape):
    spec = dataset_spec(flag)
    split = load_split(spec, "train", fixture_data, download=False)
    assert split.images.dtype == torch.uint8 and tuple(split.images.shape[1:]) == shape
    assert split.labels.dtype == torch.int64 and split.labels.dim() == 1


def test_multilabel_labels_keep_their_label_axis(fixture_data):
    split = load_split(dataset_spec("chestmnist"), "val", fixture_data, download=False)
    assert split.labels.shape == (32, 14)


def test_size_64_files_are_found(fixture_data):
    split = load_split(dataset_spec("pneumoniamnist", 64), "test", fixture_data, download=False)
    assert tuple(split.images.shape[1:]) == (64, 64)


@pytest.mark.parametrize("source, name, flag, size", [
    ("pneumoniamnist.npz", "pneumoniamnist_64.npz", "pneumoniamnist", 64),  # 28-pixel data under the 64 name
    ("retinamnist.npz", "pneumoniamnist.npz", "pneumoniamnist", 28),  # RGB data under a grey dataset's name
])
def test_a_file_whose_images_do_not_fit_its_name_is_refused(fixture_data, tmp_path, source, name, flag, size):
    # an outside probe: 28-pixel data saved as pathmnist_64.npz trained (rc 0, a summary claiming 64x64) and the
    # export then failed on the ONNX input size, naming neither the file nor the cause
    (tmp_path / "medmnist").mkdir()
    shutil.copy(fixture_data / "medmnist" / source, tmp_path / "medmnist" / name)
    with pytest.raises(ValueError, match=f"{name}: its train images are"):
        load_split(dataset_spec(flag, size), "train", tmp_path, download=False)


def _altered(array: np.ndarray, change: str) -> np.ndarray:
    return {"float images": lambda a: a.astype(np.float32) / 255, "label 9": lambda a: np.full_like(a, 9),
            "label -1": lambda a: a.astype(np.int16) - 1, "labels short": lambda a: a[:-5],
            "labels one wide": lambda a: a[:, :1], "empty": lambda a: a[:0]}[change](array)


@pytest.mark.parametrize("flag, key, change, message", [
    ("pneumoniamnist", "train_images", "float images", "float32 images; MedMNIST images are uint8"),
    ("pneumoniamnist", "train_labels", "label 9", "labels from 9 to 9 .*takes integers 0 to 1"),
    ("retinamnist", "train_labels", "label -1", "labels from -1 to .*takes integers 0 to 4"),
    ("retinamnist", "train_labels", "labels short", "labels of shape .* for .* images"),
    ("chestmnist", "train_labels", "labels one wide", r"has \(.*, 14\)"),
    ("pneumoniamnist", "train_images", "empty", "is empty"),
])
def test_a_split_that_cannot_train_is_refused_on_loading_with_the_file_named(fixture_data, tmp_path, flag, key,
                                                                             change, message):
    # an outside probe: float images trained to chance (rc 0); a label out of range, a label count short of the
    # images or multi-label labels one wide failed mid-training with PyTorch's traceback or words; an empty split
    # after training
    source = np.load(fixture_data / "medmnist" / f"{flag}.npz")
    arrays = {k: source[k] for k in source.files}
    arrays[key] = _altered(arrays[key], change)
    if change == "empty":
        arrays["train_labels"] = arrays["train_labels"][:0]
    (tmp_path / "medmnist").mkdir()
    np.savez_compressed(tmp_path / "medmnist" / f"{flag}.npz", **arrays)
    with pytest.raises(DataCorruptError, match=f"{flag}.npz: its train split .*{message}"):
        load_split(dataset_spec(flag), "train", tmp_path, download=False)


def test_mnist_from_gz_in_a_read_only_dir_and_val_carved_from_train(fixture_data, tmp_path):
    spec = dataset_spec("mnist")
    train = load_split(spec, "train", fixture_data, download=False)
    val = load_split(spec, "val", fixture_data, download=False)
    test = load_split(spec, "test", fixture_data, download=False)
    assert (len(train), len(val)) == (550, 50)  # the last 1/12 of train is val (5,000 of 60,000 for real)
    assert len(test) == 200 and test.images.shape[1:] == (28, 28)


def test_missing_data_offline_names_the_file(tmp_path):
    with pytest.raises(DataNotFoundError, match=r"pneumoniamnist\.npz not found.*--download"):
        load_split(dataset_spec("pneumoniamnist"), "train", tmp_path, download=False)
    with pytest.raises(DataNotFoundError, match="MNIST not found"):
        load_split(dataset_spec("mnist"), "train", tmp_path, download=False)


def test_a_failed_download_is_one_line_naming_the_file_the_url_and_the_cause(tmp_path, monkeypatch, capsys):
    """An outside probe: downloads on (the default) without a network gave three chained tracebacks."""
    from urllib.error import URLError

    import torchvision.datasets.mnist
    import torchvision.datasets.utils

    def unreachable(url, root, filename=None, md5=None, **kwargs):
        Path(root, filename).write_bytes(b"PK\x03\x04 half")  # a partial file, as a cut connection leaves
        raise URLError(OSError(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", unreachable)
    with pytest.raises(DataNotFoundError, match=r"pneumoniamnist\.npz not found, and downloading it from https://"
                                                r"\S+ failed \(URLError: \[Errno -3\] Temporary failure") as caught:
        load_split(dataset_spec("pneumoniamnist"), "train", tmp_path, download=True)
    assert "md5" in str(caught.value) and caught.value.__cause__ is None
    assert not (tmp_path / "medmnist" / "pneumoniamnist.npz").exists()  # not read as a corrupt file next time

    def no_mirror(url, download_root, filename=None, md5=None, **kwargs):
        raise URLError("unreachable")

    monkeypatch.setattr(torchvision.datasets.mnist, "download_and_extract_archive", no_mirror)
    with pytest.raises(DataNotFoundError, match=r"MNIST not found in .*, and downloading it failed \(RuntimeError: "
                                                r"Error downloading .* <urlopen error unreachable>"):
        load_split(dataset_spec("mnist"), "train", tmp_path, download=True)
    capsys.readouterr()  # torchvision prints each mirror it tried


@pytest.mark.parametrize("damage", ["random bytes", "truncated", "no test arrays"])
def test_an_unreadable_npz_is_named_with_what_to_do(tmp_path, damage):
    path = tmp_path / "medmnist" / "pneumoniamnist.npz"
    path.parent.mkdir()
    arrays = {f"{s}_{k}": np.zeros((4, 28, 28) if k == "images" else (4, 1), np.uint8)
              for s in ("train", "val") for k in ("images", "labels")}
    np.savez(path, **arrays)
    if damage == "random bytes":
        path.write_bytes(np.random.default_rng(0).bytes(5000))
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    expected = r"pneumoniamnist\.npz is not a readable MedMNIST npz.*--download.*md5"
    with pytest.raises(DataCorruptError, match=expected) as err:
        load_split(dataset_spec("pneumoniamnist"), "test", tmp_path, download=False)
    assert "allow_pickle" not in str(err.value)


def test_batches_are_deterministic_per_epoch_and_shard_disjointly():
    split = Split(torch.arange(100, dtype=torch.uint8).reshape(100, 1), torch.arange(100))
    a = Batches(split, 10, shuffle=True, seed=1)
    first = [y.tolist() for _, y in a]
    assert first == [y.tolist() for _, y in a]  # same epoch, same order
    a.set_epoch(1)
    assert first != [y.tolist() for _, y in a]
    shards = [Batches(split, 7, shuffle=True, seed=1, rank=r, world_size=2) for r in range(2)]
    seen = [torch.cat([y for _, y in s]) for s in shards]
    assert len(seen[0]) == len(seen[1]) == 50
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    assert len(Batches(split, 30, drop_last=True)) == 3
