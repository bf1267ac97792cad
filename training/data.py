"""Datasets as in-memory uint8 tensors, and a batch iterator that shuffles and shards them.

MNIST comes through ``torchvision.datasets.MNIST`` and MedMNIST through the ``medmnist`` package's
dataset classes, each in its own on-disk layout under one data directory::

    DATA_DIR/MNIST/raw/*-ubyte(.gz)      torchvision's raw MNIST layout
    DATA_DIR/medmnist/<flag>[_<size>].npz

Images stay uint8 in the dataset's own layout (N,H,W) / (N,H,W,3) / (N,D,H,W): exactly what the exported
model takes, so preprocessing lives inside the model and the service needs no pixel knowledge.
"""

from __future__ import annotations

import gzip
import hashlib
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.error import HTTPError

import medmnist
import numpy as np
import torch
from torchvision.datasets import MNIST

from serving.model_card import atomic_write
from training.config import CACHE_DIR, DEFAULT_DATA_DIR

MNIST_FLAG = "mnist"
MNIST_VAL_FRACTION = 12  # MNIST has no official val split: the last 1/12 of train (5,000 of 60,000) is one
SPLITS = ("train", "val", "test")


class DataNotFoundError(FileNotFoundError):
    """A dataset file is missing and downloading is off (or failed)."""


class DataCorruptError(ValueError):
    """A dataset file is there but is not what its name says (truncated, another format, arrays missing)."""


@dataclass(frozen=True)
class DatasetSpec:
    """What a model needs to know about a dataset."""

    flag: str
    size: int
    task: str
    labels: tuple[str, ...]
    n_channels: int
    is_3d: bool

    @property
    def num_outputs(self) -> int:
        return len(self.labels)

    @property
    def layout(self) -> str:
        if self.is_3d:
            return "NDHW"
        return "NHWC" if self.n_channels == 3 else "NHW"

    @property
    def image_shape(self) -> tuple[int, ...]:
        s = self.size
        if self.is_3d:
            return (s, s, s)
        return (s, s, 3) if self.n_channels == 3 else (s, s)


def medmnist_flags() -> list[str]:
    """All MedMNIST flags the installed package knows (12 2D + 6 3D in medmnist 3)."""
    return list(medmnist.INFO)


def dataset_flags() -> list[str]:
    """Every dataset a config may name: MNIST and the MedMNIST flags."""
    return [MNIST_FLAG, *medmnist_flags()]


def available_sizes(flag: str) -> list[int]:
    """The image sizes ``flag`` is published at (MedMNIST+: 28, 64, 128, 224 for 2D; 28, 64 for 3D)."""
    if flag == MNIST_FLAG:
        return [28]
    return list(getattr(medmnist, medmnist.INFO[flag]["python_class"]).available_sizes)


def official_split_sizes(flag: str) -> dict[str, int]:
    """Images per official split, from the package's metadata (no data file needed)."""
    if flag == MNIST_FLAG:
        return {"train": 60_000 - 60_000 // MNIST_VAL_FRACTION, "val": 60_000 // MNIST_VAL_FRACTION, "test": 10_000}
    if flag not in medmnist.INFO:
        raise ValueError(f"unknown dataset {flag!r}; known: {', '.join(dataset_flags())}")
    return {s: int(medmnist.INFO[flag]["n_samples"][s]) for s in SPLITS}


def is_local(flag: str, size: int, data_dir: Path) -> bool:
    """Whether ``data_dir`` holds the dataset's file(s) at this size, so it loads without downloading."""
    if flag == MNIST_FLAG:
        raw = Path(data_dir) / "MNIST" / "raw"
        return any(all((raw / f"{f}{ext}").exists() for f in _MNIST_FILES) for ext in ("", ".gz"))
    return medmnist_path(Path(data_dir), flag, size).exists()


def medmnist_path(data_dir: Path, flag: str, size: int) -> Path:
    """Where the ``medmnist`` package keeps ``flag`` at ``size``: ``DATA_DIR/medmnist/<flag>[_<size>].npz``."""
    return data_dir / "medmnist" / f"{flag}{'' if size == 28 else f'_{size}'}.npz"


def dataset_spec(flag: str, size: int = 28) -> DatasetSpec:
    if flag not in dataset_flags():
        raise ValueError(f"unknown dataset {flag!r}; known: {', '.join(dataset_flags())}")
    if size not in available_sizes(flag):
        raise ValueError(f"{flag} is available at sizes {available_sizes(flag)}, not {size}")
    if flag == MNIST_FLAG:
        return DatasetSpec(MNIST_FLAG, 28, "multi-class", tuple(str(d) for d in range(10)), 1, False)
    info = medmnist.INFO[flag]
    cls = getattr(medmnist, info["python_class"])
    labels = tuple(info["label"][str(i)] for i in range(len(info["label"])))
    is_3d = issubclass(cls, medmnist.dataset.MedMNIST3D)
    return DatasetSpec(flag, size, info["task"], labels, info["n_channels"], is_3d)


@dataclass
class Split:
    """One split in memory: uint8 images in the dataset layout and integer labels."""

    images: torch.Tensor  # uint8
    labels: torch.Tensor  # int64: (N,) single-label, (N, L) multi-label

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, n: int | None) -> Split:
        return self if n is None or n >= len(self) else Split(self.images[:n], self.labels[:n])


def load_split(spec: DatasetSpec, split: str, data_dir: Path = DEFAULT_DATA_DIR, download: bool = True) -> Split:
    """Load one official split into memory."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if spec.flag == MNIST_FLAG:
        return _load_mnist(split, Path(data_dir), download)
    return _load_medmnist(spec, split, Path(data_dir), download)


def _load_medmnist(spec: DatasetSpec, split: str, data_dir: Path, download: bool) -> Split:
    path = medmnist_path(data_dir, spec.flag, spec.size)
    root, suffix = path.parent, "" if spec.size == 28 else f"_{spec.size}"
    info = medmnist.INFO[spec.flag]
    if not path.exists():
        if not download:
            raise DataNotFoundError(
                f"{path} not found. Download it with --download (or CNNSERVE_DOWNLOAD=1), or fetch "
                f"{info[f'url{suffix}']} (md5 {info[f'MD5{suffix}']}) into {root}/"
            )
        root.mkdir(parents=True, exist_ok=True)
    cls = getattr(medmnist, info["python_class"])
    existed = path.exists()
    try:  # download only when the file is missing: the package's md5 check would re-fetch local fixtures
        ds = cls(split=split, root=str(root), size=spec.size, download=not existed)
    except (ValueError, OSError, EOFError, KeyError, RuntimeError, zipfile.BadZipFile) as exc:
        if not existed:  # the download failed (medmnist's RuntimeError over the network's error): what is left of
            path.unlink(missing_ok=True)  # it is not the file, and would be read as a corrupt one next time
            raise DataNotFoundError(
                f"{path} not found, and downloading it from {info[f'url{suffix}']} failed ({_download_error(exc)}). "
                f"Fetch it (md5 {info[f'MD5{suffix}']}) into {root}/ by other means, or point --data-dir at a copy"
            ) from None
        raise DataCorruptError(
            f"{path} is not a readable MedMNIST npz: {_unreadable_reason(exc, split)}. Delete it and download it "
            f"again (--download), or fetch {info[f'url{suffix}']} (md5 {info[f'MD5{suffix}']}) into {root}/"
        ) from exc
    _check_arrays(path, split, ds.imgs, ds.labels, spec)
    images = torch.from_numpy(np.ascontiguousarray(ds.imgs))
    labels = torch.from_numpy(ds.labels.astype(np.int64))
    if spec.task != "multi-label, binary-class":
        labels = labels.reshape(-1)
    return Split(images, labels)


def _download_error(exc: BaseException) -> str:
    """The root cause of a failed download, in one line (medmnist and torchvision wrap the network's error)."""
    seen = {id(exc)}
    while (cause := exc.__cause__ or exc.__context__) is not None and id(cause) not in seen:
        exc = cause
        seen.add(id(exc))
    reason = getattr(exc, "reason", None)  # a URLError's own cause (an HTTPError's, its status: said by str(exc))
    told = exc if reason is None or isinstance(exc, HTTPError) else reason
    return " ".join(f"{type(exc).__name__}: {told}".split())  # torchvision's message runs over lines


def _unreadable_reason(exc: BaseException, split: str) -> str:
    """Why ``np.load`` or the medmnist class could not read a file, in words (numpy's own message for a file that
    is not an archive suggests loading it with ``allow_pickle``, which would run whatever it holds)."""
    if isinstance(exc, zipfile.BadZipFile | EOFError):
        return f"it is not a complete zip archive, truncated or another format ({exc})"
    if isinstance(exc, KeyError):
        return f"it has no {split}_images / {split}_labels arrays ({exc})"
    if isinstance(exc, ValueError) and "pickle" in str(exc):
        return "it is not an npz archive (numpy would have to unpickle it, which is never done)"
    return f"{type(exc).__name__}: {exc}"


def _check_arrays(path: Path, split: str, images: np.ndarray, labels: np.ndarray, spec: DatasetSpec) -> None:
    """Refuse a split that is not what the file's name promises, before any training: local files skip medmnist's
    md5 check, so this is the guard left. A 28-pixel file saved under the 64-pixel name trained without a word and
    export then failed on the ONNX input size; float images trained to chance (the models take raw uint8 pixels);
    a label out of range, a label count that is not the image count, labels of the wrong width for a multi-label
    task or an empty split failed only once training was under way, in PyTorch's words."""
    where = f"{path}: its {split} split"
    expected = (spec.size,) * (3 if spec.is_3d else 2) + ((3,) if spec.n_channels == 3 else ())
    if tuple(images.shape[1:]) != expected:
        raise DataCorruptError(f"{path}: its {split} images are {list(images.shape[1:])}, but {spec.flag} at size "
                               f"{spec.size} has {list(expected)}: the file is not {path.name} (another size or "
                               "dataset?)")
    if images.dtype != np.uint8:
        raise DataCorruptError(f"{where} has {images.dtype} images; MedMNIST images are uint8 pixels 0-255")
    if len(images) == 0:
        raise DataCorruptError(f"{where} is empty")
    width = spec.num_outputs if spec.task == "multi-label, binary-class" else 1
    if labels.ndim != 2 or labels.shape != (len(images), width):
        raise DataCorruptError(f"{where} has labels of shape {list(labels.shape)} for {len(images)} images; "
                               f"{spec.flag} ({spec.task}) has ({len(images)}, {width})")
    top = 1 if width > 1 else spec.num_outputs - 1
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() > top:
        raise DataCorruptError(f"{where} has labels from {labels.min()} to {labels.max()} ({labels.dtype}); "
                               f"{spec.flag} takes integers 0 to {top}")


_MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _mnist_root(data_dir: Path, download: bool) -> Path:
    """A directory where torchvision finds the unpacked raw files.

    ``.gz`` files are unpacked into a cache keyed by their identity, never beside them: the data dir may
    be a shared, read-only copy (and root ignores permission bits).
    """
    raw = data_dir / "MNIST" / "raw"
    if all((raw / f).exists() for f in _MNIST_FILES):
        return data_dir
    gz_files = [raw / f"{f}.gz" for f in _MNIST_FILES]
    if all(p.exists() for p in gz_files):
        identity = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in gz_files)
        target = CACHE_DIR / "mnist-unpacked" / hashlib.sha1(identity.encode()).hexdigest()[:16]
        target_raw = target / "MNIST" / "raw"
        target_raw.mkdir(parents=True, exist_ok=True)
        for name, gz in zip(_MNIST_FILES, gz_files, strict=True):
            if not (target_raw / name).exists():
                with gzip.open(gz, "rb") as src, atomic_write(target_raw / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        return target
    if not download:
        raise DataNotFoundError(
            f"MNIST not found in {raw} (expected {', '.join(_MNIST_FILES)}, optionally .gz). "
            "Download it with --download, or copy torchvision's raw MNIST files there."
        )
    data_dir.mkdir(parents=True, exist_ok=True)
    return data_dir


def _load_mnist(split: str, data_dir: Path, download: bool) -> Split:
    root = _mnist_root(data_dir, download)
    fetching = download and root == data_dir and not all((root / "MNIST" / "raw" / f).exists() for f in _MNIST_FILES)
    try:
        ds = MNIST(str(root), train=split != "test", download=download and root == data_dir)
    except (OSError, RuntimeError) as exc:  # torchvision tries each mirror, then raises its RuntimeError
        if not fetching:  # the files were there: not a download's failure
            raise
        raise DataNotFoundError(f"MNIST not found in {data_dir / 'MNIST' / 'raw'}, and downloading it failed "
                                f"({_download_error(exc)}). Copy torchvision's raw MNIST files (.gz or unpacked) "
                                "there, or point --data-dir at a copy") from None
    images, labels = ds.data, ds.targets.long()
    n_val = len(images) // MNIST_VAL_FRACTION if split != "test" else 0
    if split == "train":
        images, labels = images[:-n_val], labels[:-n_val]
    elif split == "val":
        images, labels = images[-n_val:], labels[-n_val:]
    return Split(images.contiguous(), labels)


class Batches:
    """Iterate over an in-memory split in (optionally shuffled and sharded) batches.

    The order of epoch ``e`` depends only on ``(seed, e)``, so a resumed run sees the same batches.
    Each of ``world_size`` ranks takes an equal, disjoint share (DistributedSampler semantics).
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        self.device = torch.device(device)
        # on a GPU the whole split moves once; batches are then sliced there
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.images)
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=gen)
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            per_rank = n // self.world_size
            order = order[self.rank * per_rank : (self.rank + 1) * per_rank]
        return order

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        return len(self._indices())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = self._indices().to(self.device)
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            if self.drop_last and len(idx) < self.batch_size:
                break
            yield self.images[idx], self.labels[idx]
