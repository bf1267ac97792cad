"""Uploaded files -> one image in a model's input layout (the only pixel work the service does)."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from serving.errors import InvalidInput, PayloadTooLarge, UnprocessableInput, UnsupportedMediaType
from serving.model_card import ModelCard

NPY_MAGIC = b"\x93NUMPY"
SUPPORTED = "PNG, JPEG, BMP, TIFF (2D models) or .npy (any model)"


def decode_upload(data: bytes, card: ModelCard, max_pixels: int, filename: str = "") -> tuple[np.ndarray, list[str]]:
    """Decode ``data`` and convert it to ``card``'s input: (image, notes on what was converted)."""
    if not data:
        raise InvalidInput(f"upload {filename!r} is empty")
    if data.startswith(NPY_MAGIC):
        return _from_npy(data, card, filename)
    if card.layout == "NDHW":
        raise UnsupportedMediaType(f"model {card.name} takes 3D volumes {card.input.shape}: upload a uint8 .npy")
    return _from_image(data, card, max_pixels, filename)


def _from_npy(data: bytes, card: ModelCard, filename: str) -> tuple[np.ndarray, list[str]]:
    try:
        array = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise UnprocessableInput(f"{filename or 'upload'} is not a readable .npy array: {exc}") from None
    if array.dtype != np.uint8:
        raise InvalidInput(f"{filename or 'upload'}: .npy dtype must be uint8, got {array.dtype}")
    if list(array.shape) != card.input.shape:
        raise InvalidInput(f"{filename or 'upload'}: .npy shape {list(array.shape)} does not match model "
                           f"{card.name} input {card.input.shape}")
    return array, []


def _from_image(data: bytes, card: ModelCard, max_pixels: int, filename: str) -> tuple[np.ndarray, list[str]]:
    name = filename or "upload"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only: nothing decoded yet
    except UnidentifiedImageError:
        raise UnsupportedMediaType(f"{name} is not an image this service reads ({SUPPORTED})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLarge(f"{name}: image dimensions are over the decoder's safety limit") from None
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(f"{name} is {width}x{height} = {width * height} pixels, over the limit of "
                              f"{max_pixels} (decompression-bomb guard)")
    if image.format not in ("PNG", "JPEG", "BMP", "TIFF", "MPO"):
        raise UnsupportedMediaType(f"{name}: {image.format} images are not accepted ({SUPPORTED})")
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnprocessableInput(f"{name} is truncated or corrupt ({image.format}): {exc}") from None
    notes = []
    mode = "RGB" if card.layout == "NHWC" else "L"
    if image.mode != mode:
        notes.append(f"converted {image.mode} to {mode}")
        image = image.convert(mode)
    target = (card.input.shape[1], card.input.shape[0])  # PIL size is (width, height)
    if image.size != target:
        notes.append(f"resized {width}x{height} to {target[0]}x{target[1]}")
        image = image.resize(target, Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8), notes
