"""What framing uploads of another size does for accuracy, and how much of each dataset's images their strokes fill.

    python -m benchmarks.framing --data-dir ../shared/data [--images 500]

The shipped mnist-cnn (latest version) classifies the first ``--images`` digits of MNIST's test split, each put in
an upload of another shape (centred on a wider or taller black canvas, cropped tight to its strokes, or drawn
in dark ink on a 300x400 sheet of paper) and decoded by ``serving.images.decode_upload`` as ``/classify`` does:
framed to the card's strokes share, and stretched (the same card without a share, which ``/classify`` resizes as
it is). Beside it, ``input_strokes_share`` as export measures it on the training split of every local dataset.
Writes benchmarks/results/framing.{json,md}.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image

from benchmarks.publish import write_results
from serving.images import decode_upload
from serving.model_card import ModelCard, read_card
from training.data import DataNotFoundError, dataset_flags, dataset_spec, load_split
from training.export import border_grey_level, strokes_share

ROOT = Path(__file__).resolve().parents[1]
MAX_PIXELS = 16 * 1024 * 1024


def _canvas(width: int, height: int) -> Callable[[np.ndarray], np.ndarray]:
    def centred(digit: np.ndarray) -> np.ndarray:
        out = np.zeros((height, width), np.uint8)
        top, left = (height - 28) // 2, (width - 28) // 2
        out[top:top + 28, left:left + 28] = digit
        return out
    return centred


def _tight(digit: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(digit > 30)
    return digit[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def _on_paper(digit: np.ndarray) -> np.ndarray:
    """Dark ink (grey 40) on paper (grey 200), the digit 300 pixels high on a 300x400 portrait sheet."""
    ink = np.asarray(Image.fromarray(digit).resize((300, 300), Image.Resampling.BILINEAR), np.float64) / 255
    sheet = np.full((400, 300), 200.0)
    sheet[50:350] = 200 + (40 - 200) * ink
    return sheet.astype(np.uint8)


SHAPES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "28x28 (as MNIST)": lambda digit: digit, "56x28 canvas": _canvas(56, 28), "28x56 canvas": _canvas(28, 56),
    "84x28 canvas": _canvas(84, 28), "28x84 canvas": _canvas(28, 84), "cropped tight": _tight,
    "300x400 paper": _on_paper,
}


def _accuracy(session: ort.InferenceSession, card: ModelCard, digits: np.ndarray, labels: np.ndarray,
              shape: Callable[[np.ndarray], np.ndarray]) -> float:
    def png(pixels: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        return buffer.getvalue()

    batch = np.stack([decode_upload(png(shape(digit)), card, MAX_PIXELS)[0] for digit in digits])
    return float((session.run(["probs"], {"images": batch})[0].argmax(1) == labels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--images", type=int, default=500, help="MNIST test digits to classify in each shape")
    args = parser.parse_args()

    version = max((ROOT / "exports" / "mnist-cnn").iterdir(), key=lambda p: int(p.name))
    card = read_card(version / "model.json")
    stretching = dataclasses.replace(card, input_strokes_share=None, dataset={**card.dataset, "name": "other"})
    session = ort.InferenceSession(str(version / "model.onnx"), providers=["CPUExecutionProvider"])
    test = load_split(dataset_spec("mnist"), "test", args.data_dir, download=False).subset(args.images)
    digits, labels = test.images.numpy(), test.labels.numpy()
    rows = [{"upload": name, "stretched": _accuracy(session, stretching, digits, labels, shape),
             "framed": _accuracy(session, card, digits, labels, shape)} for name, shape in SHAPES.items()]

    shares = []
    for flag in dataset_flags():
        try:
            images = load_split(dataset_spec(flag), "train", args.data_dir, download=False).images.numpy()
        except DataNotFoundError:
            continue
        background = border_grey_level(images)
        shares.append({"dataset": flag, "input_background": background,
                       "input_strokes_share": strokes_share(images, background)})

    lines = [f"# Framing uploads of another size (`python -m benchmarks.framing --images {args.images}`)", "",
             f"mnist-cnn/{version.name} on the first {args.images} digits of MNIST's test split, each in an upload of "
             "the shape named, decoded as `/classify` decodes it: stretched to 28x28, or framed to the card's "
             "strokes share (20 of 28 for MNIST). Accuracy:", "",
             "| upload | stretched | framed |", "|---|---|---|",
             *(f"| {r['upload']} | {r['stretched']:.3f} | {r['framed']:.3f} |" for r in rows), "",
             "`input_strokes_share` as export measures it on each local training split (none: the background is "
             "not black or white, or the images are volumes):", "",
             "| dataset | input_background | input_strokes_share |", "|---|---|---|",
             *(f"| {s['dataset']} | {s['input_background']} | {s['input_strokes_share'] or 'none'} |" for s in shares)]
    print(write_results("framing", {"model": f"mnist-cnn/{version.name}", "images": args.images, "accuracy": rows,
                                    "strokes_share": shares}, "\n".join(lines) + "\n"))


if __name__ == "__main__":
    main()
