"""Image bytes -> facts and pixels, the one decoder every stage uses (ingest, training, scoring).

- ``probe_image`` reads the header only (no pixel decode): format, stored size, EXIF orientation and
  the displayed size, plus a cheap integrity check (the end-of-image marker is present).
- ``decode_image`` returns an RGB image in display orientation, decoded at the smallest JPEG draft
  scale that still covers what the caller needs, so a 50-megapixel photo never lands in memory at
  full size when the model wants 342 pixels.

Both raise ``ImageError`` with a stage and a specific reason, which callers turn into
``rejected``/``error`` rows. The pixel limit is deliberate: ``MAX_PIXELS`` (default 250 MP, or the
``MPEMD_MAX_PIXELS`` variable) caps the declared size before any decode, and Pillow's own
``Image.MAX_IMAGE_PIXELS`` is set to the same number so no code path decodes a bigger image.
"""

from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

MAX_PIXELS = int(os.environ.get("MPEMD_MAX_PIXELS", 250_000_000))
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# Pillow only warns between 1x and 2x its limit; ``_open`` refuses every such image itself, so the
# warning adds nothing (and catching it per call cost a third of a header probe).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never grey pixels

Image.init()
# Every format Pillow opens here, except those that run an external program on the file (EPS:
# Ghostscript), need one that is not installed (WMF) or are stubs without a decoder.
_NOT_DECODED = frozenset({"EPS", "WMF", "MPEG", "BUFR", "GRIB", "HDF5", "IPTC", "IMT", "PCD"})
SUPPORTED_FORMATS = frozenset(Image.OPEN) - _NOT_DECODED | {"MPO"}
# Orientations 5..8 swap width and height on display.
_TRANSPOSED_ORIENTATIONS = frozenset({5, 6, 7, 8})
_EXIF_ORIENTATION_TAG = 0x0112


class ImageError(Exception):
    """An image that cannot be used; ``stage`` is ``fetch`` or ``decode``."""

    def __init__(self, reason: str, stage: str = "decode") -> None:
        super().__init__(reason)
        self.reason = reason
        self.stage = stage


@dataclass(frozen=True)
class ImageInfo:
    format: str
    mode: str
    raw_width: int
    raw_height: int
    orientation: int
    width: int  # as displayed (after EXIF orientation)
    height: int
    n_frames: int

    @property
    def aspect_ratio(self) -> float:
        """Height / width as displayed, METHOD.md's aspect ratio."""
        return self.height / self.width

    @property
    def raw_aspect_ratio(self) -> float:
        return self.raw_height / self.raw_width

    def as_dict(self) -> dict:
        return {**asdict(self), "aspect_ratio": self.aspect_ratio, "raw_aspect_ratio": self.raw_aspect_ratio}


def _open(data: bytes) -> Image.Image:
    if not data:
        raise ImageError("empty file (0 bytes)", stage="fetch")
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageError(f"decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        head = data[:64].lstrip().lower()
        kind = "HTML page" if head.startswith((b"<!doctype html", b"<html")) else "unknown format"
        raise ImageError(f"not an image ({kind})") from exc
    except Exception as exc:  # Pillow raises many types on garbage headers
        if "truncated" in str(exc).lower():
            raise ImageError(f"truncated file (header incomplete: {exc})") from exc
        raise ImageError(f"unreadable header: {type(exc).__name__}: {exc}") from exc
    if img.format not in SUPPORTED_FORMATS:
        raise ImageError(f"unsupported image format {img.format}")
    w, h = img.size
    if w <= 0 or h <= 0:
        raise ImageError(f"invalid size {w}x{h}")
    if w * h > MAX_PIXELS:
        raise ImageError(f"decompression bomb: {w}x{h} = {w * h} pixels > limit {MAX_PIXELS}")
    return img


def _orientation(img: Image.Image) -> int:
    try:
        value = int(img.getexif().get(_EXIF_ORIENTATION_TAG, 1))
    except Exception:  # a broken EXIF block does not make the pixels unusable
        return 1
    return value if 1 <= value <= 8 else 1


def _jpeg_header(data: bytes) -> tuple[list[tuple[int, bytes]], int | None]:
    """(marker, payload) of each header segment before the first scan, and the scan's offset.

    Walking the segments (rather than searching for markers) skips an EXIF thumbnail's own markers
    inside APP1. The offset is None when the header does not parse (a byte that is not a marker,
    or no scan at all); the segments read until then are still returned.
    """
    segments: list[tuple[int, bytes]] = []
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return segments, None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker == 0xDA:
            return segments, pos
        length = int.from_bytes(data[pos + 2:pos + 4], "big")
        segments.append((marker, data[pos + 4:pos + 2 + length]))
        pos += 2 + length
    return segments, None


def _jpeg_scan_offset(data: bytes) -> int | None:
    """Offset of the first start-of-scan marker; None if the header does not parse."""
    return _jpeg_header(data)[1]


def _huffman_problem(segment: bytes) -> str | None:
    """An impossible table in a DHT payload: its 16 code counts sum past 256."""
    at = 0
    while at + 17 <= len(segment):
        n_codes = sum(segment[at + 1:at + 17])
        if n_codes > 256:
            return f"corrupt Huffman table (declares {n_codes} codes, at most 256 exist)"
        at += 17 + n_codes
    return None


def _looks_truncated(data: bytes, fmt: str) -> bool:
    tail = data[-4096:].rstrip(b"\x00\r\n ")
    if fmt in ("JPEG", "MPO"):
        if tail.endswith(b"\xff\xd9"):
            return False
        # Bytes after the end-of-image marker (phone trailers, motion-photo videos) are not
        # truncation. Entropy-coded data cannot hold FF D9, so an EOI after the scan starts is real.
        scan = _jpeg_scan_offset(data)
        return scan is None or data.find(b"\xff\xd9", scan) < 0
    if fmt == "PNG":
        return b"IEND" not in tail[-16:]
    return False


def _jpeg_table_problem(data: bytes) -> str | None:
    """Report an impossible Huffman table among the header segments.

    Pillow's header parse skips DHT segments, so without this a file whose tables are garbage
    passes the cheap check and only fails at full decode (libjpeg: 'Bogus Huffman table').
    """
    for marker, segment in _jpeg_header(data)[0]:
        problem = _huffman_problem(segment) if marker == 0xC4 else None
        if problem:
            return problem
    return None


def _check_structure(data: bytes, img: Image.Image) -> None:
    """Cheap integrity checks that need no pixel decode: end markers, Huffman tables, PNG CRCs."""
    fmt = img.format or "?"
    if _looks_truncated(data, fmt):
        raise ImageError("truncated file (no end-of-image marker)")
    if fmt in ("JPEG", "MPO"):
        problem = _jpeg_table_problem(data)
        if problem:
            raise ImageError(problem)
    elif fmt == "PNG":
        try:  # verify() checks every chunk's CRC without decompressing pixels
            Image.open(io.BytesIO(data)).verify()
        except Exception as exc:
            raise ImageError(f"corrupt PNG (bad chunk CRC or structure): {exc}") from exc


_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_MODES = {1: "L", 3: "RGB", 4: "CMYK"}


def _exif_orientation(segment: bytes) -> int:
    """Orientation (1..8) from an APP1 ``Exif`` payload; 1 when absent or unreadable (as Pillow)."""
    try:
        tiff = segment[6:]
        order = {b"II": "little", b"MM": "big"}[tiff[:2]]
        ifd = int.from_bytes(tiff[4:8], order)
        for i in range(int.from_bytes(tiff[ifd:ifd + 2], order)):
            entry = ifd + 2 + 12 * i
            if int.from_bytes(tiff[entry:entry + 2], order) == _EXIF_ORIENTATION_TAG:
                value = int.from_bytes(tiff[entry + 8:entry + 10], order)
                return value if 1 <= value <= 8 else 1
    except (KeyError, IndexError, ValueError):
        pass
    return 1


def _fast_jpeg_info(data: bytes) -> ImageInfo | None:
    """Header facts of a plain JPEG from one walk over its segments, without Pillow.

    Pillow's header parse costs most of a probe (it decodes quantisation tables too), which
    matters when ingest scans a quarter of a million files. Anything unusual (no SOF before the
    scan, a multi-picture file, a bad table, a size over the limit) returns None, and the caller
    takes the Pillow path, which gives the precise error.
    """
    if data[:2] != b"\xff\xd8" or _looks_truncated(data, "JPEG"):
        return None
    segments, scan = _jpeg_header(data)
    if scan is None:
        return None
    size, orientation = None, 1
    for marker, segment in segments:
        if marker in _SOF_MARKERS and size is None and len(segment) >= 6:
            size = (int.from_bytes(segment[3:5], "big"), int.from_bytes(segment[1:3], "big"), segment[5])
        elif marker == 0xE1 and segment[:6] == b"Exif\x00\x00" and orientation == 1:
            orientation = _exif_orientation(segment)
        elif marker == 0xE2 and segment[:4] == b"MPF\x00":
            return None  # a multi-picture (MPO) file: Pillow knows its frames
        elif marker == 0xC4 and _huffman_problem(segment):
            return None
    if size is None or size[2] not in _JPEG_MODES or size[0] <= 0 or size[1] <= 0:
        return None
    raw_w, raw_h, components = size
    if raw_w * raw_h > MAX_PIXELS:
        return None
    w, h = (raw_h, raw_w) if orientation in _TRANSPOSED_ORIENTATIONS else (raw_w, raw_h)
    return ImageInfo(format="JPEG", mode=_JPEG_MODES[components], raw_width=raw_w, raw_height=raw_h,
                     orientation=orientation, width=w, height=h, n_frames=1)


def probe_image(data: bytes, *, full_decode: bool = False) -> ImageInfo:
    """Header facts without decoding pixels; ``full_decode`` also decodes them to prove they load."""
    if not full_decode:
        fast = _fast_jpeg_info(data)
        if fast is not None:
            return fast
    img = _open(data)
    fmt = img.format or "?"
    _check_structure(data, img)
    orientation = _orientation(img)
    raw_w, raw_h = img.size
    w, h = (raw_h, raw_w) if orientation in _TRANSPOSED_ORIENTATIONS else (raw_w, raw_h)
    info = ImageInfo(
        format=fmt, mode=img.mode, raw_width=raw_w, raw_height=raw_h, orientation=orientation,
        width=w, height=h, n_frames=int(getattr(img, "n_frames", 1)),
    )
    if full_decode:
        _load(img)
    return info


def _load(img: Image.Image) -> None:
    try:
        img.load()
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        msg = str(exc)
        reason = "truncated file" if "truncated" in msg.lower() else f"corrupt image data: {msg}"
        raise ImageError(reason) from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any mode -> 8-bit RGB. Transparency is composited on white; 16-bit is scaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min(initial=0)), float(arr.max(initial=1))
        scaled = (arr - lo) / (hi - lo or 1.0) * 255.0
        return Image.fromarray(scaled.astype(np.uint8), "L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, P without alpha


def decode_image(data: bytes, *, min_short_side: int | None = None) -> Image.Image:
    """Decode to RGB in display orientation.

    With ``min_short_side``, JPEGs decode through draft mode at the smallest DCT scale (1/2, 1/4,
    1/8) whose shorter side is still at least that many pixels; the exact resize happens later.
    Animated files give their first frame.
    """
    img = _open(data)
    _check_structure(data, img)
    if min_short_side and img.format in ("JPEG", "MPO") and img.mode in ("RGB", "L", "CMYK", "YCbCr"):
        w, h = img.size
        scale = min_short_side / min(w, h)
        if scale < 1.0:
            # draft() keeps the result at least as large as the requested size
            img.draft(img.mode if img.mode != "YCbCr" else "RGB", (max(1, int(w * scale)), max(1, int(h * scale))))
    _load(img)
    # A broken EXIF block keeps the stored orientation rather than losing the image.
    with contextlib.suppress(Exception):
        img = ImageOps.exif_transpose(img)
    return _to_rgb(img)


def image_to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> uint8 tensor (3, H, W)."""
    import torch  # here, not at module import: listing and planning need no torch
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def decode_to_tensor(data: bytes, *, min_short_side: int | None = None) -> torch.Tensor:
    """``decode_image`` then ``image_to_tensor``: uint8 (3, H, W) in display orientation."""
    return image_to_tensor(decode_image(data, min_short_side=min_short_side))
