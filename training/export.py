"""Export a trained checkpoint to the model repository: ``<repo>/<name>/<version>/{model.onnx,model.json}``.

The ONNX graph takes raw uint8 pixels (``images``, dataset layout, dynamic batch) and returns ``probs``
(softmax, or sigmoid for multi-label, of the logits divided by a temperature fitted on the val split: see
``training.calibration``) and ``logits`` (uncalibrated). Export fails unless onnxruntime matches PyTorch
on real test images. Publishing is atomic: a temporary directory renamed to the next free version.
``calibrate_version`` republishes an exported version with the temperature folded into its graph,
``quantize_version`` as a static int8 network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from serving.model_card import (
    INPUT_NAME,
    LOGITS_NAME,
    PROBS_NAME,
    BatchingSpec,
    ModelCard,
    TensorSpec,
    file_sha256,
    plain_background,
    read_card,
    stroke_pixels,
    write_json_atomic,
)
from training.calibration import calibration_report, fit_temperature, probabilities
from training.checkpoint import load_model
from training.config import MIN_AGREEMENT, check_model_name
from training.data import DEFAULT_DATA_DIR, DatasetSpec, Split, dataset_spec, load_split
from training.evaluate import (
    headline_metrics,
    inference_batch_size,
    onnx_largest_activation,
    predict_logits,
    predict_onnx,
    predicted_labels,
)
from training.models import Classifier, Ensemble

OPSET = 18
PARITY_IMAGES = 512
PARITY_TOLERANCE = 1e-4


class ExportError(ValueError):
    """The exported model does not match PyTorch, or cannot be published (the command line reports it in one
    line, as a bad config)."""


class ExportWrapper(nn.Module):
    """uint8 images -> (probs, logits): what the service runs. ``temperature`` (shape (1,), or one per label
    for multi-label heads) divides the logits before the softmax / sigmoid; ``logits`` stay as they are.

    An ensemble's logits are its members' mean probability in logit form, so one temperature calibrates
    the combination that is served (calibrated members would not average to a calibrated mean)."""

    def __init__(self, model: Classifier | Ensemble, multi_label: bool,
                 temperature: torch.Tensor | None = None) -> None:
        super().__init__()
        self.model, self.multi_label = model, multi_label
        self.register_buffer("temperature", temperature)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images)
        return probabilities(logits, self.multi_label, self.temperature), logits


def export_onnx(model: Classifier | Ensemble, spec: DatasetSpec, path: Path, temperature: torch.Tensor | None = None
                ) -> None:
    wrapper = ExportWrapper(model, spec.task.startswith("multi-label"), temperature).eval()
    example = torch.zeros((2, *spec.image_shape), dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(wrapper, (example,), input_names=[INPUT_NAME], output_names=[PROBS_NAME, LOGITS_NAME],
                                opset_version=OPSET, dynamo=True, dynamic_shapes=({0: batch},), verbose=False)
    program.save(str(path))


def check_parity(model: Classifier | Ensemble, onnx_path: Path, images: torch.Tensor, multi_label: bool,
                 temperature: torch.Tensor | None = None) -> dict[str, Any]:
    """Compare onnxruntime with PyTorch (calibrated by ``temperature``) on ``images``; raise ``ExportError``
    past the tolerance."""
    expected = probabilities(predict_logits(model, images), multi_label, temperature).numpy()
    return _compare_probs(expected, predict_onnx(onnx_path, images.numpy()), multi_label)


def _compare_probs(expected: np.ndarray, got: np.ndarray, multi_label: bool) -> dict[str, Any]:
    """The largest probability difference, and whether every decision is the same: the top class, or for a
    multi-label model each label's probability over 0.5 (the top label alone said nothing of the others)."""
    if not (np.isfinite(expected).all() and np.isfinite(got).all()):  # NaN > tolerance is False: it passed
        raise ExportError(f"the model's probabilities are not finite (NaN or inf) on {len(got)} test images: its "
                          "training diverged; train it again (a lower --lr)")
    max_diff = float(np.abs(expected - got).max())
    if multi_label:
        what, same = "labels_identical", bool(((expected > 0.5) == (got > 0.5)).all())
    else:
        what, same = "argmax_identical", bool((expected.argmax(1) == got.argmax(1)).all())
    if max_diff > PARITY_TOLERANCE or not same:
        raise ExportError(f"ONNX parity check failed on {len(got)} test images: max |dprob| {max_diff:.2e} "
                          f"(limit {PARITY_TOLERANCE:.0e}), {what.replace('_', ' ')}: {same}")
    return {"images": len(got), "max_abs_prob_diff": max_diff, what: same}


def input_surround(images: np.ndarray) -> dict[str, Any]:
    """The card's ``input_background`` and ``input_strokes_share``, measured on the training ``images``."""
    background = border_grey_level(images)
    return {"input_background": background, "input_strokes_share": strokes_share(images, background)}


def strokes_share(images: np.ndarray, background: int, sample: int = 5000) -> float | None:
    """The median share of an image's longer side that the box around its strokes fills (``ModelCard``), over the
    first ``sample`` images; None for a background that is not black or white, or for 3D volumes."""
    colour = images.ndim == 4 and images.shape[-1] == 3
    if not plain_background(background) or not (images.ndim == 3 or colour):
        return None
    images = images[:sample]
    ink = stroke_pixels(images, background, colour)
    extents = []
    for mask in (ink.any(axis=2), ink.any(axis=1)):  # (N, H) rows and (N, W) columns with any stroke
        first, last = mask.argmax(axis=1), mask.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)
        extents.append(np.where(mask.any(axis=1), last - first + 1, 0))
    longer = np.maximum(*extents)
    if not longer.any():
        return None
    return round(float(np.median(longer[longer > 0])) / max(images.shape[1:3]), 4)


def border_grey_level(images: np.ndarray) -> int:
    """Median of the images' outermost rows and columns: what surrounds the subject (card ``input_background``)."""
    border = np.concatenate([images[:, [0, -1]].ravel(), images[:, :, [0, -1]].ravel()])
    return round(float(np.median(border)))


def quantize_int8(fp32_path: Path, int8_path: Path, calibration: np.ndarray) -> None:
    """Static int8 quantisation (QDQ, per-channel) calibrated on training images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    step = inference_batch_size(onnx_largest_activation(fp32_path, calibration.shape[1:]), 64)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{INPUT_NAME: calibration[i : i + step]} for i in range(0, len(calibration), step)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.batches, None)

    prepared = int8_path.with_suffix(".prep.onnx")
    source = prepared
    try:  # recommended (shape inference + optimisation), but onnxruntime 1.30's rejects some valid graphs
        quant_pre_process(str(fp32_path), str(prepared))
    except Exception as exc:  # any failure here only skips an optional step
        print(f"warning: quant_pre_process failed ({type(exc).__name__}: {exc}); quantising the exported graph as is")
        source = fp32_path
    quantize_static(str(source), str(int8_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    nodes_to_exclude=head_nodes(onnx.load(str(source))))
    prepared.unlink(missing_ok=True)


WEIGHTED_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def head_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes with no weighted layer after them on any path to the outputs: the classifier layer
    itself, the temperature, the softmax / sigmoid, an ensemble's mean. Quantised, they put the logits and the
    probabilities themselves on uint8 grids (an outside probe: 13 distinct values over 624 test images, every
    row summing to 254/255); they cost next to nothing to keep in float."""
    nodes = list(model.graph.node)  # in topological order, as ONNX requires
    feeds_weighted: set[str] = set()  # tensors with a weighted layer downstream of them
    head = []
    for node in reversed(nodes):
        downstream = bool(feeds_weighted.intersection(node.output))
        if not downstream:
            head.append(node)
        if downstream or node.op_type in WEIGHTED_OPS:
            feeds_weighted.update(node.input)
    return [node.name for node in head if node.name]


def ort_images_per_second(path: Path, images: np.ndarray, batch: int = 64, repeats: int = 20) -> float:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = images[:batch]
    session.run(None, {INPUT_NAME: x})
    t0 = time.perf_counter()
    for _ in range(repeats):
        session.run(None, {INPUT_NAME: x})
    return len(x) * repeats / (time.perf_counter() - t0)


def git_commit() -> str:
    """The commit of the checkout this code runs from ("-dirty" with uncommitted changes; "unknown" outside one),
    whatever the working directory (an outside probe's cards recorded an unrelated repository's commit)."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                                cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=here).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def next_version(model_root: Path) -> int:
    if not model_root.exists():
        return 1
    versions = [int(p.name) for p in model_root.iterdir() if p.is_dir() and p.name.isdigit()]
    return max(versions, default=0) + 1


def _exported_from(model_root: Path, checkpoint_sha256: str, quantize: str | None) -> list[int]:
    """The versions under ``model_root`` exported from the checkpoint file with this sha256 (quantized alike)."""
    found = []
    for card_path in model_root.glob("*/model.json") if model_root.is_dir() else ():
        try:
            card = read_card(card_path)
        except (OSError, ValueError):  # not this command's business: the service reports unreadable cards
            continue
        if (card.training.get("checkpoint_sha256") == checkpoint_sha256
                and (card.quantization is None) == (quantize is None)):
            found.append(card.version)
    return sorted(found)


def export_checkpoint(
    checkpoint: Path,
    repo_dir: Path,
    name: str | None = None,
    data_dir: Path = DEFAULT_DATA_DIR,
    download: bool = True,
    quantize: str | None = None,
    command: str = "",
    notes: str = "",
    min_agreement: float = MIN_AGREEMENT,
) -> Path:
    """Calibrate on the val split, export, check, evaluate on the test split and publish one model version;
    returns its directory. ``quantize="int8"`` publishes the int8 network, unless it decides fewer than
    ``min_agreement`` of the test images as the float one does."""
    model, cfg, ckpt = load_model(checkpoint)
    if name is not None:
        check_model_name(name, "--name")
    spec = dataset_spec(cfg.dataset, cfg.size)
    multi_label = spec.task.startswith("multi-label")
    checkpoint_sha256 = file_sha256(checkpoint)
    twins = _exported_from(repo_dir / (name or cfg.name), checkpoint_sha256, quantize)
    if twins:  # allowed (a new opset, a rebuilt card), but the new version duplicates them and becomes the default
        print(f"warning: {checkpoint} was exported already as {name or cfg.name} version(s) "
              f"{', '.join(map(str, twins))}; the new version is the same network", file=sys.stderr)
    val, test = (load_split(spec, s, data_dir, download) for s in ("val", "test"))
    temperature = fit_temperature(predict_logits(model, val.images), val.labels, multi_label)
    with _staging(repo_dir / (name or cfg.name)) as staging:
        onnx_path = staging / "model.onnx"
        export_onnx(model, spec, onnx_path, temperature)
        parity = check_parity(model, onnx_path, test.images[:PARITY_IMAGES], multi_label, temperature)
        probs = predict_onnx(onnx_path, test.images.numpy())
        metrics = headline_metrics(spec.task, torch.from_numpy(probs), test.labels)
        quantization = None
        if quantize == "int8":
            quantization, metrics = _quantize_in_place(onnx_path, load_split(spec, "train", data_dir, download),
                                                        test, spec)
            _check_agreement(quantization, min_agreement, "the float network")
        elif quantize is not None:
            raise ValueError(f"unknown quantization {quantize!r}; only int8 is supported")
        return _publish(staging, dict(
            name=name or cfg.name, task=spec.task, labels=list(spec.labels),
            input=TensorSpec(INPUT_NAME, "UINT8", list(spec.image_shape)), layout=spec.layout,
            outputs=[TensorSpec(PROBS_NAME, "FP32", [spec.num_outputs]),
                     TensorSpec(LOGITS_NAME, "FP32", [spec.num_outputs])],
            dataset={"name": spec.flag, "size": spec.size,
                     "splits": _split_sizes(spec, data_dir, download, cfg.train_limit)},
            metrics={"test": {**metrics, "n": len(test)}, "parity": parity,
                     "best_val": {cfg.select_metric: ckpt["best_metric"]}},
            training={"command": command, "git_commit": git_commit(), "created_utc": _now(),
                      "epochs_run": ckpt["epoch"] + 1, "config": cfg.recorded(), "notes": notes,
                      "checkpoint_sha256": checkpoint_sha256},
            batching=BatchingSpec(), quantization=quantization,
            **input_surround(load_split(spec, "train", data_dir, download).images.numpy()),
            calibration=_calibration_section(onnx_path, temperature, spec, val, test),
        ))


def calibrate_version(version_dir: Path, data_dir: Path = DEFAULT_DATA_DIR, download: bool = True,
                      command: str = "", report_dir: Path | None = None) -> Path:
    """Publish the next version of an exported model with a temperature folded into its graph.

    The temperature is fitted on the val-split ``logits`` of ``version_dir``'s ONNX file; the new graph is the
    same network with ``probs = softmax(logits / T)`` (sigmoid per label for multi-label heads). Fails unless
    the new file's logits equal the old file's and its probs match the calibrated old logits. ``version_dir``
    itself is left untouched. ``report_dir``: where to write the test split's reliability diagram."""
    source, card, spec = _exported_version(version_dir)
    if card.calibration is not None:
        raise ValueError(f"{version_dir} is calibrated already (temperature {card.calibration['temperature']})")
    val, test = (load_split(spec, s, data_dir, download) for s in ("val", "test"))
    temperature = fit_temperature(predict_onnx(source, val.images.numpy(), output=LOGITS_NAME), val.labels,
                                  card.multi_label)
    with _staging(Path(version_dir).parent) as staging:
        onnx_path = staging / "model.onnx"
        onnx.save(fold_temperature(onnx.load(str(source)), temperature, card.multi_label), str(onnx_path))
        parity = _check_folded(source, onnx_path, test.images[:PARITY_IMAGES].numpy(), card.multi_label, temperature)
        probs = predict_onnx(onnx_path, test.images.numpy())
        metrics = headline_metrics(spec.task, torch.from_numpy(probs), test.labels)
        return _publish(staging, _derived_card_fields(
            card, command, "calibrated_from",
            metrics={**card.metrics, "test": {**metrics, "n": len(test)}, "parity": parity},
            calibration=_calibration_section(onnx_path, temperature, spec, val, test, report_dir),
            **input_surround(load_split(spec, "train", data_dir, download).images.numpy()),
        ))


def quantize_version(version_dir: Path, data_dir: Path = DEFAULT_DATA_DIR, download: bool = True,
                     command: str = "", allow_slower: bool = False, min_agreement: float = MIN_AGREEMENT) -> Path:
    """Publish the next version of an exported model as a static int8 network (``quantize_int8``: calibrated on
    training images, the classifier layer and the head after it kept in float).

    The card keeps the source's calibration temperature and re-measures everything the weights change: the
    test metrics, beside the source's on the same split (``quantization``), the calibration before / after on
    val and test, the speed-up. The source's ONNX-vs-PyTorch parity and best val score describe the float network
    and are left out (its card keeps them). ``version_dir`` itself is left untouched. An int8 network measured
    slower than the float one at batch 1 and at batch 64 is not published (the latest version is what the service
    serves by default) unless ``allow_slower``; nor is one that decides fewer than ``min_agreement`` of the test
    images as the float network does (an outside probe's RetinaMNIST model with its high-pass input filter changed
    10 % of its decisions when quantised, and was published)."""
    source, card, spec = _exported_version(version_dir)
    if card.quantization is not None:
        raise ValueError(f"{version_dir} is quantised already ({card.quantization['method']})")
    train, val, test = (load_split(spec, s, data_dir, download) for s in ("train", "val", "test"))
    with _staging(Path(version_dir).parent) as staging:
        onnx_path = staging / "model.onnx"
        shutil.copyfile(source, onnx_path)
        quantization, metrics = _quantize_in_place(onnx_path, train, test, spec)
        _check_agreement(quantization, min_agreement, f"version {card.version}")
        slower = {k: v for k, v in quantization.items() if k.startswith("speedup_")}
        if not allow_slower and all(v < 1 for v in slower.values()):
            raise ValueError(f"the int8 network ran slower than version {card.version} on this CPU ({slower}; "
                             "onnxruntime's int8 kernels do not cover every layer, 3D convolutions for one): not "
                             "published, as the latest version is what the service serves; --allow-slower "
                             "publishes it anyway")
        calibration = None
        if card.calibration is not None:
            temperature = torch.tensor(card.calibration["temperature"])
            calibration = {**_calibration_section(onnx_path, temperature, spec, val, test),
                           "fitted_on": f"val, on the float logits of version {card.version} (kept when quantised)"}
        return _publish(staging, _derived_card_fields(
            card, command, "quantized_from",
            metrics={"test": {**metrics, "n": len(test)}},
            quantization=quantization, calibration=calibration,
        ))


def _check_agreement(quantization: dict[str, Any], min_agreement: float, source: str) -> None:
    """Refuse an int8 network that decides fewer than ``min_agreement`` of the test images as ``source`` does."""
    agree = quantization["test_decisions_same_as_fp32"]
    if agree < min_agreement:
        raise ExportError(f"the int8 network decides {agree:.2%} of the test images as {source} does, below "
                          f"{min_agreement:.2%}: not published, as the latest version is what the service serves; "
                          "--min-agreement lowers the bar")


def _exported_version(version_dir: Path) -> tuple[Path, ModelCard, DatasetSpec]:
    """An exported version's ONNX file, checked against its card; the card; its dataset."""
    source = Path(version_dir) / "model.onnx"
    card = read_card(Path(version_dir) / "model.json")
    if card.sha256 != file_sha256(source):
        raise ValueError(f"{source} does not match the sha256 in its card")
    return source, card, dataset_spec(card.dataset["name"], card.dataset["size"])


def _derived_card_fields(card: ModelCard, command: str, origin: str, **changed: Any) -> dict[str, Any]:
    """The card fields of a version made from ``card``'s: the same, but for ``changed`` and a training section
    naming this ``command`` and, under ``origin``, the source version and how that one was made."""
    fields = {f.name: getattr(card, f.name) for f in dataclasses.fields(card) if f.name not in ("version", "sha256")}
    made_by = {k: card.training.get(k) for k in ("command", "git_commit", "created_utc")}
    fields.update(changed, training={**card.training, "command": command, "git_commit": git_commit(),
                                     "created_utc": _now(),
                                     origin: {"version": card.version, "sha256": card.sha256, **made_by}})
    return fields


def fold_temperature(model: onnx.ModelProto, temperature: torch.Tensor, multi_label: bool) -> onnx.ModelProto:
    """``model`` with its ``probs = Softmax(logits)`` node (``Sigmoid`` for multi-label) replaced by
    ``probs = Softmax(Div(logits, T))``; everything up to ``logits`` stays as it is."""
    graph = model.graph
    op = "Sigmoid" if multi_label else "Softmax"
    index = next((i for i, n in enumerate(graph.node) if PROBS_NAME in n.output), None)
    head = graph.node[index] if index is not None else None
    if head is None or head.op_type != op or list(head.input) != [LOGITS_NAME]:
        raise ValueError(f"cannot fold a temperature into this graph: {PROBS_NAME} is not {op}({LOGITS_NAME})")
    scaled = "calibrated_logits"
    graph.initializer.append(onnx.numpy_helper.from_array(temperature.numpy().astype(np.float32), "temperature"))
    divide = onnx.helper.make_node("Div", [LOGITS_NAME, "temperature"], [scaled], name="calibration_div")
    calibrated = onnx.helper.make_node(op, [scaled], [PROBS_NAME], name=f"calibration_{op.lower()}")
    calibrated.attribute.extend(head.attribute)
    del graph.node[index]
    graph.node.insert(index, calibrated)
    graph.node.insert(index, divide)
    onnx.checker.check_model(model)
    return model


def _check_folded(source: Path, folded: Path, images: np.ndarray, multi_label: bool,
                  temperature: torch.Tensor) -> dict[str, Any]:
    """The folded graph's logits equal the source's, and its probs are the calibrated source logits."""
    logits = predict_onnx(source, images, output=LOGITS_NAME)
    logit_diff = float(np.abs(predict_onnx(folded, images, output=LOGITS_NAME) - logits).max())
    if logit_diff > PARITY_TOLERANCE:
        raise ExportError(f"the calibrated graph changed the logits (max |dlogit| {logit_diff:.2e})")
    expected = probabilities(torch.from_numpy(logits), multi_label, temperature).numpy()
    return {**_compare_probs(expected, predict_onnx(folded, images), multi_label), "max_abs_logit_diff": logit_diff}


def _calibration_section(onnx_path: Path, temperature: torch.Tensor, spec: DatasetSpec, val: Split, test: Split,
                         report_dir: Path | None = None) -> dict[str, Any]:
    """Calibration before / after on val and test, measured on the exported file's ``logits``; with
    ``report_dir``, the test split's reliability diagram too."""
    splits = {name: (torch.from_numpy(predict_onnx(onnx_path, s.images.numpy(), output=LOGITS_NAME)), s.labels)
              for name, s in (("val", val), ("test", test))}
    if report_dir is not None:
        from training.report import plot_reliability_diagram

        multi_label, (logits, labels) = spec.task.startswith("multi-label"), splits["test"]
        report_dir.mkdir(parents=True, exist_ok=True)
        plot_reliability_diagram({"uncalibrated": probabilities(logits, multi_label),
                                  "temperature-scaled": probabilities(logits, multi_label, temperature)},
                                 labels, multi_label, report_dir / "reliability_diagram.png",
                                 f"{spec.flag} test reliability")
    return calibration_report(temperature, spec.task, splits)


@contextlib.contextmanager
def _staging(model_root: Path) -> Iterator[Path]:
    """A temporary directory inside ``model_root``, removed on the way out unless published. Made by ``mkdir``,
    whose permissions follow the umask, not ``tempfile.mkdtemp``'s owner-only 0700: the directory becomes the
    published version, which a server running as another user must be able to read. A ``model_root`` this call
    made is removed again when nothing was published into it (a failed first export left an empty model folder)."""
    made = not model_root.exists()
    model_root.mkdir(parents=True, exist_ok=True)
    staging = model_root / f".staging-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if made:
            with contextlib.suppress(OSError):  # not empty: a version was published (or another export's staging)
                model_root.rmdir()


def _publish(staging: Path, card_fields: dict[str, Any]) -> Path:
    """Stamp the card into ``staging/model.onnx``, write ``model.json`` beside it and rename ``staging`` to the
    next free version of its model (atomic; never overwrites a version)."""
    model_root = staging.parent
    version = next_version(model_root)
    onnx_path = staging / "model.onnx"
    card_fields = {**card_fields, "version": version}
    _add_metadata(onnx_path, ModelCard(**card_fields, sha256="0" * 64).metadata_props())
    card = ModelCard(**card_fields, sha256=file_sha256(onnx_path))
    write_json_atomic(staging / "model.json", card.to_dict())
    final = model_root / str(version)
    try:
        os.rename(staging, final)  # atomic; fails if the version appeared meanwhile
    except OSError as exc:
        raise ExportError(f"{final} already exists: versions are never overwritten") from exc
    return final


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _split_sizes(spec: DatasetSpec, data_dir: Path, download: bool, train_limit: int | None) -> dict[str, int]:
    sizes = {s: len(load_split(spec, s, data_dir, download)) for s in ("train", "val", "test")}
    if train_limit:
        sizes["train"] = min(sizes["train"], train_limit)
    return sizes


def _add_metadata(path: Path, props: dict[str, str]) -> None:
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, props)
    onnx.save(model, str(path))


def _quantize_in_place(onnx_path: Path, train: Any, test: Any, spec: DatasetSpec
                       ) -> tuple[dict[str, Any], dict[str, float]]:
    """Replace the float model at ``onnx_path`` by its int8 version; -> the card's ``quantization`` section (both
    models scored on ``test``) and the int8 model's test metrics."""
    int8_path = onnx_path.with_name("model.int8.onnx")
    rng = np.random.default_rng(0)
    calibration = train.images.numpy()[rng.choice(len(train), size=min(512, len(train)), replace=False)]
    quantize_int8(onnx_path, int8_path, calibration)
    images = test.images.numpy()
    per_image = onnx_largest_activation(onnx_path, images.shape[1:])  # the speed's larger batch: 64 unless too big
    probs, fp32_probs = predict_onnx(int8_path, images), predict_onnx(onnx_path, images)
    int8_metrics = headline_metrics(spec.task, torch.from_numpy(probs), test.labels)
    fp32_metrics = {**headline_metrics(spec.task, torch.from_numpy(fp32_probs), test.labels), "n": len(test)}
    decided = [predicted_labels(spec.task, torch.from_numpy(p)) for p in (probs, fp32_probs)]
    agree = (decided[0] == decided[1]).float().mean().item()  # multi-label: per label
    speedup = {f"speedup_batch{batch}_cpu": round(ort_images_per_second(int8_path, images, batch, repeats)
                                                  / ort_images_per_second(onnx_path, images, batch, repeats), 3)
               for batch, repeats in ((1, 500), (inference_batch_size(per_image, 64), 20))}
    os.replace(int8_path, onnx_path)
    info = {"method": f"onnxruntime static QDQ int8, per-channel, {len(calibration)} calibration images; the "
                      "classifier layer and the head after it (temperature, softmax / sigmoid) kept in float",
            "fp32_test": fp32_metrics, "int8_test": int8_metrics,
            "acc_change": int8_metrics["acc"] - fp32_metrics["acc"],
            "auc_change": int8_metrics["auc"] - fp32_metrics["auc"],
            "test_decisions_same_as_fp32": agree, "test_max_abs_prob_diff": float(np.abs(probs - fp32_probs).max()),
            **speedup}
    return info, int8_metrics
