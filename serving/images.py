"""Uploaded files -> one image in a model's input layout (the only pixel work the service does).

Every step that changes pixels adds a note (the reply's ``converted`` list), in this order:

1. Orientation: cameras store pixels as shot and an EXIF Orientation tag (2-8) saying how to turn them; the
   image is turned upright (``ImageOps.exif_transpose``): "turned upright by EXIF orientation 6".
2. Bit depth, to 8 bits:

   - 16-bit greyscale (modes I;16, I;16B, I;16L; PNG and TIFF, e.g. exported X-ray and CT slices) has a fixed
     depth: value × 255 / 65535, rounded.
   - 32-bit integer (I) and floating-point (F) greyscale (TIFF) have no fixed depth: the image's own value
     range min..max is stretched to 0..255 (a constant image becomes 0); NaN or infinite values are refused.
   - 16-bit colour (PNG/TIFF RGB, RGBA and grey + alpha, which Pillow opens as RGB or RGBA) is reduced by
     Pillow's decoder, which keeps each value's high byte (value // 256: at most 1 below value × 255 / 65535);
     grey + alpha is then grey + alpha (LA) again, and the notes name it so.
3. Transparency (RGBA, LA, PA, or P/L/RGB with a transparent colour): composited on the card's
   ``input_background`` grey level, what surrounds the training images (0, black, for MNIST), not dropped;
   for a drawing on a transparent canvas (90 % of the border transparent) whose strokes are dark (light) like a
   black (white) card background, as black strokes on an HTML canvas are for MNIST, on white (black) instead, so
   that they do not vanish (step 5 then inverts them). An alpha channel with no transparent pixel is dropped.
   A card that does not record its background (written before cards did) gets black, and steps 5 and 6 skip it:
   what its training images sat on is not known (version 1 of the X-ray models inverted light-bordered X-rays).
4. Colour: to L for NHW models, RGB for NHWC; other colour spaces (CMYK, YCbCr) go through RGB first.
   Pillow's formulas (RGB -> L is ITU-R 601-2 luma); embedded ICC profiles are not applied.
5. Polarity: when the card's training images sit on black (or white) and at least 90 % of the upload's border is
   on the other side of mid-grey (a dark digit on white paper for MNIST), the image is inverted: "inverted: its
   border is light, ...". Cards with another background (X-rays on grey 140) are never inverted.
6. Background level: for those same cards, an upload whose border is plain (90 % of it within 24 grey levels of
   its median) but not at the card's level, e.g. paper at grey 235 (20 once inverted), is stretched so that its
   border goes to the card's level and its strongest strokes (99th percentile) to the other end: "levelled: ...".
   The models learnt digits on exact black: mnist-cnn answered "8" for 98 of 100 real digits on grey-235 paper.
7. Size: bilinear resize to the model's height and width. For those same cards, when the card records how much
   of its training images their strokes fill (MNIST: 20 of 28 pixels), an upload of any other size is framed the
   same way: cropped to its strokes, resized, centred on the background ("framed: ..."); other cards' uploads are
   resized as they are ("stretched" when the aspect ratio changes).
"""

from __future__ import annotations

import io
import struct
import warnings
from tokenize import TokenError

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from serving.errors import InvalidInput, PayloadTooLarge, UnprocessableInput, UnsupportedMediaType
from serving.model_card import ModelCard, plain_background, stroke_pixels

NPY_MAGIC = b"\x93NUMPY"
FORMATS = ("PNG", "JPEG", "BMP", "TIFF", "GIF", "WEBP", "MPO")  # Pillow's names; MPO: a JPEG with its previews
SUPPORTED = "PNG, JPEG, BMP, TIFF, GIF, WebP (2D models) or .npy (any model)"
# the first bytes of the formats read here (WebP: RIFF....WEBP, checked as RIFF)
MAGIC = {b"\x89PNG\r\n\x1a\n": "PNG", b"\xff\xd8": "JPEG", b"GIF87a": "GIF", b"GIF89a": "GIF", b"BM": "BMP",
         b"II*\x00": "TIFF", b"MM\x00*": "TIFF", b"RIFF": "WebP"}
RANGE_SCALED = {"I": "32-bit integer", "F": "floating-point"}  # greyscale modes without a fixed bit depth
OPPOSITE_BORDER = 0.9  # share of an upload's border pixels on the other side of mid-grey that means "inverted"
PLAIN_BORDER = 24  # border pixels this close to the border's median: plain (paper, a screen), not a picture
LEVEL_TOLERANCE = 8  # a plain border this close to the card's background is left as it is
MIN_CONTRAST = 32  # strokes less far than this from the border's level: nothing to stretch
MNIST_STROKES_SHARE = 20 / 28  # MNIST's framing (its cards from before they recorded it): 20 of 28 pixels


def decode_upload(data: bytes, card: ModelCard, max_pixels: int, filename: str = "") -> tuple[np.ndarray, list[str]]:
    """Decode ``data`` and convert it to ``card``'s input: (image, notes on what was converted)."""
    upload = f"upload {filename!r}" if filename else "upload"
    if not data:
        raise InvalidInput(f"{upload} is empty")
    if data.startswith(NPY_MAGIC):
        return _from_npy(data, card, upload)
    if card.layout == "NDHW":
        raise UnsupportedMediaType(f"{upload}: model {card.name} takes 3D volumes {card.input.shape}: "
                                   "upload a uint8 .npy")
    return _from_image(data, card, max_pixels, upload)


def check_request_pixels(uploads: list[bytes], limit: int) -> None:
    """Refuse (413) uploads whose headers declare more than ``limit`` pixels together (0 = no limit), before any is
    decoded: 1,024 blank 4096x4096 PNGs are 16 MB to send and took a worker 40 s of decoding (an outside probe)."""
    total = sum(_declared_pixels(data) for data in uploads)
    if limit and total > limit:
        raise PayloadTooLarge(f"the {len(uploads)} uploads declare {total} pixels together, over the limit of {limit} "
                              "per request (CNNSERVE_MAX_REQUEST_PIXELS): send fewer or smaller images per request")


def _declared_pixels(data: bytes) -> int:
    """Width x height that an image file's header declares; 0 for a .npy array (its size is the card's) or a file
    whose header does not read (decoding it says why)."""
    if data.startswith(NPY_MAGIC):
        return 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as image:
                width, height = image.size
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError, EOFError):
        return 0
    return width * height


def _bmp_width_negative(data: bytes) -> bool:
    """Whether ``data`` is a BMP whose info header (40 bytes or more: a signed width) declares a negative width,
    which no BMP has (a negative height means top-down rows; the width must be positive)."""
    return (data[:2] == b"BM" and len(data) >= 22 and int.from_bytes(data[14:18], "little") >= 40
            and int.from_bytes(data[18:22], "little", signed=True) < 0)


def _from_npy(data: bytes, card: ModelCard, upload: str) -> tuple[np.ndarray, list[str]]:
    """The array, its dtype and shape checked from the header before any data is read (a 230-byte file can declare
    a terabyte)."""
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _fortran_order, dtype = read_header(stream)
    except (ValueError, OSError, EOFError, SyntaxError, TokenError) as exc:
        why = "its header is not a plain dictionary" if "malformed node" in str(exc) else str(exc)  # not ast's repr
        raise UnprocessableInput(f"{upload} is not a readable .npy array: {why}") from None
    if dtype != np.uint8:
        raise InvalidInput(f"{upload}: .npy dtype must be uint8, got {dtype}")
    if list(shape) != card.input.shape:
        raise InvalidInput(f"{upload}: .npy shape {list(shape)} does not match model {card.name} input "
                           f"{card.input.shape}")
    try:
        return np.load(io.BytesIO(data), allow_pickle=False), []
    except (ValueError, OSError, EOFError) as exc:
        raise UnprocessableInput(f"{upload} is not a readable .npy array: {exc}") from None


def _from_image(data: bytes, card: ModelCard, max_pixels: int, upload: str) -> tuple[np.ndarray, list[str]]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))  # reads the header only: nothing decoded yet
    except UnidentifiedImageError:
        kind = next((name for magic, name in MAGIC.items() if data.startswith(magic)), None)
        if kind is not None:  # one of ours by its signature, which no decoder could open: damaged, not foreign
            raise UnprocessableInput(f"{upload} is a corrupt {kind} file (its header does not read)") from None
        raise UnsupportedMediaType(f"{upload} is not an image this service reads ({SUPPORTED})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        if _bmp_width_negative(data):  # Pillow reads the signed width unsigned: 4 billion pixels wide
            raise UnprocessableInput(f"{upload} is a corrupt BMP file (its header declares a negative width)") from None
        raise PayloadTooLarge(f"{upload}: image dimensions are over the decoder's safety limit") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # a header cut short, a chunk over Pillow's limits
        raise UnprocessableInput(f"{upload} is truncated or corrupt: {exc}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(f"{upload} is {width}x{height} = {width * height} pixels, over the limit of "
                              f"{max_pixels} (decompression-bomb guard)")
    if image.format not in FORMATS:
        kind = "Netpbm (PBM, PGM, PPM)" if image.format == "PPM" else image.format  # Pillow's name for all three
        raise UnsupportedMediaType(f"{upload}: {kind} images are not accepted ({SUPPORTED})")
    frames = getattr(image, "n_frames", 1) if image.format != "MPO" else 1  # MPO: a photo and its previews
    if frames > 1:
        raise UnsupportedMediaType(f"{upload} holds {frames} images (a multi-page {image.format} or an animation), "
                                   "and which one to classify is not clear: send each as a file of its own")
    reduced_16_bit = _16_bit_colour(image)
    stored_orientation = _stored_orientation(image)  # TIFF's decoder applies it in load() and drops the tag
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise UnprocessableInput(f"{upload} is truncated or corrupt ({image.format}): {exc}") from None
    source_mode, notes = image.mode, []
    try:
        if isinstance(stored_orientation, Exception):
            raise stored_orientation
        image = _upright(image, stored_orientation, notes)
        if reduced_16_bit:
            notes.append(f"reduced 16-bit {reduced_16_bit} to 8 bits (high byte of each value)")
            if reduced_16_bit == "LA":  # opened as RGBA with three equal channels: grey + alpha again, exactly
                image = image.convert("LA")
        image = _to_8_bits(image, upload, notes)
        image = _flatten_transparency(image, card.input_background, notes)
        image = _to_mode(image, "RGB" if card.layout == "NHWC" else "L", notes)
        image = _match_polarity(image, card.input_background, notes)
        image = _level_background(image, card.input_background, notes)
    except (ValueError, SyntaxError, OSError, struct.error) as exc:  # no conversion (e.g. LAB), a malformed EXIF
        raise UnprocessableInput(f"{upload}: cannot convert its {source_mode} pixels: {exc}") from None
    return np.asarray(_resized(image, card, notes), dtype=np.uint8), notes


def _resized(image: Image.Image, card: ModelCard, notes: list[str]) -> Image.Image:
    """``image`` at the model's height and width. For a card whose training images sit on black or white and that
    records how much of them their strokes fill (``input_strokes_share``; MNIST's cards from before: 20 of 28), an
    upload of any other size is framed as they were: cropped to its strokes and centred on the background, its
    strokes' longer side at that share. Stretched to shape instead, 500 real MNIST test digits centred on an
    84x28 canvas scored 0.668 and cropped tight to their strokes 0.832; framed, 0.996 in every shape tried
    (``python -m benchmarks.framing``). Other cards' uploads are resized as they are, the note saying when that
    stretches them: whether their training images were cropped or stretched to shape is not in the card."""
    target = (card.input.shape[1], card.input.shape[0])  # PIL size is (width, height)
    if image.size == target:
        return image
    share = card.input_strokes_share or (MNIST_STROKES_SHARE if card.dataset.get("name") == "mnist" else None)
    if share and plain_background(card.input_background) and \
            (framed := _framed(image, card.input_background, share, target, notes)) is not None:
        return framed
    stretched = image.width * target[1] != image.height * target[0]
    notes.append(f"resized {image.width}x{image.height} to {target[0]}x{target[1]}"
                 + (" (stretched: its aspect ratio changed)" if stretched else ""))
    return image.resize(target, Image.Resampling.BILINEAR)


def _framed(image: Image.Image, background: int, share: float, target: tuple[int, int],
            notes: list[str]) -> Image.Image | None:
    """``image`` cropped to its strokes, resized so that their longer side fills ``share`` of ``target``, and
    centred on ``background`` at ``target``'s size; None when nothing stands out from the background (faint or no
    strokes: what to crop to is not known)."""
    rows, cols = np.nonzero(stroke_pixels(np.asarray(image), background, colour=image.mode == "RGB"))
    if not rows.size:
        return None
    image = image.crop((int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1))
    width, height = image.size
    scale = share * min(target[0] / width, target[1] / height)
    fitted = (max(1, round(width * scale)), max(1, round(height * scale)))
    canvas = Image.new(image.mode, target, background if image.mode == "L" else (background,) * 3)
    canvas.paste(image.resize(fitted, Image.Resampling.BILINEAR),
                 ((target[0] - fitted[0]) // 2, (target[1] - fitted[1]) // 2))
    notes.append(f"framed: its strokes ({width}x{height}) resized to {fitted[0]}x{fitted[1]} and centred on the "
                 f"model's {_grey_name(background)} background at {target[0]}x{target[1]}, as its training images are")
    return canvas


def _16_bit_colour(image: Image.Image) -> str | None:
    """The mode of the 16-bit samples the decoder is about to reduce to 8 bits (its raw mode says; before load):
    RGB, RGBA or LA (grey + alpha, which Pillow opens as RGBA); None for 8-bit images."""
    if image.mode not in ("RGB", "RGBA") or not image.tile:
        return None
    _codec, _extents, _offset, args = image.tile[0]  # a plain tuple before Pillow 11
    rawmode = str(args if isinstance(args, str) else args[0] if args else "")  # PNG passes it alone, others a tuple
    if ";16" not in rawmode:
        return None
    return "LA" if rawmode.startswith("LA;") else image.mode  # not TIFF's RGBX or RGBa: the image's RGB or RGBA


def _stored_orientation(image: Image.Image) -> int | Exception:
    """The EXIF orientation as stored, before decoding (1 where there is none), or why it cannot be read (reported
    after the decoder has had its say on a truncated file)."""
    try:
        return image.getexif().get(ExifTags.Base.Orientation, 1)
    except (SyntaxError, OSError, ValueError, struct.error) as exc:
        return exc


def _upright(image: Image.Image, stored_orientation: int, notes: list[str]) -> Image.Image:
    """Turned upright by its EXIF orientation (2-8; 1 is upright, others are invalid and ignored); one the decoder
    already applied while loading (Pillow does for TIFF, and drops the tag) is only noted."""
    orientation = image.getexif().get(ExifTags.Base.Orientation, 1)
    if orientation in range(2, 9):
        notes.append(f"turned upright by EXIF orientation {orientation}")
        return ImageOps.exif_transpose(image)
    if stored_orientation in range(2, 9):
        notes.append(f"turned upright by EXIF orientation {stored_orientation}")
    return image


def _to_8_bits(image: Image.Image, upload: str, notes: list[str]) -> Image.Image:
    """16-bit, 32-bit integer and float greyscale -> L (LA when a transparent value is set); others unchanged."""
    if image.mode.startswith("I;16"):
        values = np.asarray(image)
        pixels = np.rint(values / 257)  # = value × 255 / 65535
        notes.append("scaled 16-bit greyscale to 8 bits (value × 255 / 65535)")
    elif image.mode in RANGE_SCALED:
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise InvalidInput(f"{upload} has NaN or infinite pixel values")
        low, high = values.min(), values.max()
        pixels = np.rint((values - low) * (255 / (high - low) if high > low else 0))
        notes.append(f"scaled {RANGE_SCALED[image.mode]} greyscale to 8 bits by its value range "
                     f"({low:g}..{high:g} to 0..255)")
    else:
        return image
    channels = [pixels.astype(np.uint8)]
    if "transparency" in image.info:
        channels.append(np.where(values == image.info["transparency"], 0, 255).astype(np.uint8))
    return Image.fromarray(np.dstack(channels) if len(channels) > 1 else channels[0])


def _match_polarity(image: Image.Image, background: int | None, notes: list[str]) -> Image.Image:
    """Inverted when the model's training images sit on black (or white) and the upload's border is almost all on
    the other side of mid-grey: a dark digit on white paper, as people write them, for a model trained on light
    digits on black (mnist-cnn answered such digits with confident nonsense: accuracy 0.99 -> 0.12)."""
    if not plain_background(background):
        return image
    border = _border(np.asarray(image.convert("L")))
    opposite = (border >= 128) if background < 128 else (border < 128)
    if opposite.mean() < OPPOSITE_BORDER:
        return image
    notes.append(f"inverted: its border is {'light' if background < 128 else 'dark'}, the model's training "
                 f"images are {'light on black' if background < 128 else 'dark on white'}")
    return ImageOps.invert(image)


def _level_background(image: Image.Image, background: int | None, notes: list[str]) -> Image.Image:
    """For a card whose training images sit on black (or white): an upload on a plain border of another grey
    level (paper that is not pure white, once inverted; a dark-grey screen) stretched so that its border goes to
    the card's level and its strongest strokes to the other end, every channel alike; other uploads unchanged."""
    if not plain_background(background):
        return image
    grey = np.asarray(image.convert("L"))
    border = _border(grey)
    level = float(np.median(border))
    if abs(level - background) <= LEVEL_TOLERANCE or (abs(border - level) <= PLAIN_BORDER).mean() < OPPOSITE_BORDER:
        return image
    far = 255 if background < 128 else 0  # the strokes' end of the scale
    ink = float(np.percentile(grey, 99 if far == 255 else 1))
    if abs(ink - level) < MIN_CONTRAST:
        return image
    pixels = np.asarray(image, dtype=np.float64)
    levelled = np.clip(np.rint(background + (pixels - level) * (far - background) / (ink - level)), 0, 255)
    notes.append(f"levelled: its background (grey {level:g}) to the model's {_grey_name(background)}, its "
                 f"strongest strokes (grey {ink:g}) to {_grey_name(far)}")
    return Image.fromarray(levelled.astype(np.uint8))  # L or RGB, as it came


def _border(pixels: np.ndarray) -> np.ndarray:
    """The values around the edge of a 2D array, each pixel once."""
    return np.concatenate([pixels[0], pixels[-1], pixels[1:-1, 0], pixels[1:-1, -1]]).astype(int)


def _flatten_transparency(image: Image.Image, background: int | None, notes: list[str]) -> Image.Image:
    """Composite transparent pixels on a grey level (``_surround``): RGB(A)/P(A) -> RGB, L(A) -> L."""
    if not image.has_transparency_data:
        return image
    background = 0 if background is None else background
    base = "L" if image.mode in ("1", "L", "LA", "La") else "RGB"
    with_alpha = image.convert(base + "A")
    alpha = with_alpha.getchannel("A")
    if alpha.getextrema()[0] == 255:
        if "A" not in image.getbands():  # a transparent colour (palette index, colour key) that no pixel has
            notes.append(f"ignored the transparent colour of {image.mode}: no pixel has it")
            image.info.pop("transparency", None)
            return image
        notes.append(f"dropped the alpha of {image.mode}: no pixel is transparent")
        return with_alpha.convert(base)
    surround, reason = _surround(with_alpha, background)
    flat = Image.composite(with_alpha.convert(base), Image.new(base, image.size, (surround,) * len(base)), alpha)
    source = "alpha" if "A" in image.getbands() else "transparent colour"
    notes.append(f"composited {image.mode} on {_grey_name(surround)} ({source}){reason}")
    return flat


def _surround(with_alpha: Image.Image, background: int) -> tuple[int, str]:
    """The grey level under transparent pixels: the card's background, except for a drawing on a transparent
    canvas (at least 90 % of the border transparent) whose opaque pixels are on the same side of mid-grey as a black
    (or white) card background, where they would vanish: black strokes, an HTML canvas's default, for MNIST. Those
    go on the opposite level, so that the strokes show and the polarity step turns them the model's way round.
    Also a reason to add to the note ("" for none)."""
    if not plain_background(background):
        return background, ""
    grey, alpha = np.moveaxis(np.asarray(with_alpha.convert("LA")), -1, 0)
    ink = grey[alpha >= 128]  # the opaque pixels' grey levels
    canvas = (_border(alpha) < 128).mean() >= OPPOSITE_BORDER
    if not canvas or ink.size == 0 or (ink.mean() >= 128) == (background < 128):
        return background, ""
    return 255 - background, (f", not on the model's {_grey_name(background)}: a drawing on a transparent canvas "
                              f"whose strokes are {'dark' if background < 128 else 'light'} would vanish")


def _grey_name(level: int) -> str:
    return {0: "black", 255: "white"}.get(level, f"grey {level}")


def _to_mode(image: Image.Image, mode: str, notes: list[str]) -> Image.Image:
    """To ``mode`` (L or RGB); colour spaces other than RGB and P (CMYK, YCbCr, ...) go through RGB."""
    if image.mode not in (mode, "1", "L", "P", "RGB"):
        notes.append(f"converted {image.mode} to RGB")
        image = image.convert("RGB")
    if image.mode != mode:
        notes.append(f"converted {image.mode} to {mode}")
        image = image.convert(mode)
    return image
