"""Generate the bad-input corpus: every hostile or odd file a nightly job meets, made by code.

``make_image_corpus(folder)`` writes the files and returns one ``CorpusItem`` per file saying what
every stage must do with it: ``expect="ok"`` (handled: converted, rotated...) with the displayed
size, or ``expect="error"`` with a word the reason must contain. ``make_label_corpus()`` returns
AVA label text with every kind of broken line and what the parser must make of each.

Run as a script to write the corpus to a folder for inspection:
``python -m tests.corpus.make_corpus /tmp/corpus``.
"""

from __future__ import annotations

import io
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, features

# Pillow's exif_transpose method for each orientation, inverted to make the stored pixels.
_STORE_FOR_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,  # displayed via ROTATE_270
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,  # displayed via ROTATE_90
}


@dataclass(frozen=True)
class CorpusItem:
    name: str  # file name (may hold spaces, unicode, leading dashes)
    image_id: int  # AVA-style id, for the ingest layout
    kind: str  # what the item is, for the docs table
    expect: str  # "ok" or "error"
    reason_contains: str = ""  # for errors: a word the reason must contain (lowercase)
    width: int | None = None  # for ok items: the displayed size
    height: int | None = None


def _canonical(width: int = 60, height: int = 40) -> Image.Image:
    """An asymmetric picture: red top-left quadrant, so orientation mistakes show."""
    arr = np.full((height, width, 3), 200, np.uint8)
    arr[: height // 2, : width // 2] = (255, 0, 0)
    arr[height // 2:, width // 2:] = (0, 0, 255)
    return Image.fromarray(arr, "RGB")


def _jpeg(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _png(img: Image.Image, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _corrupt_huffman(jpeg: bytes) -> bytes:
    """Make the first DHT's code counts impossible (they sum past 256): libjpeg's 'Bogus Huffman table'."""
    at = jpeg.index(b"\xff\xc4")
    counts = at + 5  # marker(2) + length(2) + class/id(1)
    return jpeg[:counts] + b"\xff" * 16 + jpeg[counts + 16:]


def _bad_crc_png(png: bytes) -> bytes:
    """Flip the stored CRC of the first IDAT chunk."""
    at = png.index(b"IDAT")
    length = struct.unpack(">I", png[at - 4:at])[0]
    crc_at = at + 4 + length
    return png[:crc_at] + bytes(b ^ 0xFF for b in png[crc_at:crc_at + 4]) + png[crc_at + 4:]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny file that declares 10^10 pixels: must be refused before any decode."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _encoded(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _other_formats(base: Image.Image) -> list[tuple[str, str, str, str, int | None, int | None, bytes]]:
    """One file per further format the decoder reads (Pillow's writers here), plus names that lie:
    no extension, a wrong one, and a file that is not an image by name or content."""
    w, h = base.size
    tiff_pages = _encoded(base, "TIFF", compression="tiff_lzw", save_all=True, append_images=[base.convert("L")])
    entries: list[tuple[str, str, str, str, int | None, int | None, bytes]] = [
        ("bitmap.bmp", "BMP", "ok", "", w, h, _encoded(base, "BMP")),
        ("pages.tiff", "two-page LZW TIFF (first page used)", "ok", "", w, h, tiff_pages),
        ("pixmap.ppm", "PPM (RGB)", "ok", "", w, h, _encoded(base, "PPM")),
        ("graymap.pgm", "PGM (grey)", "ok", "", w, h, _encoded(base.convert("L"), "PPM")),
        ("targa.tga", "TGA (no magic number: by extension)", "ok", "", w, h, _encoded(base, "TGA")),
        ("icon.ico", "ICO", "ok", "", 32, 32, _encoded(base.resize((32, 32)), "ICO", sizes=[(32, 32)])),
        ("paintbrush.pcx", "PCX", "ok", "", w, h, _encoded(base, "PCX")),
        ("silicon.sgi", "SGI", "ok", "", w, h, _encoded(base, "SGI")),
        ("quite_ok.qoi", "QOI", "ok", "", w, h, _encoded(base, "QOI")),
        ("surface.dds", "DDS (RGBA)", "ok", "", w, h, _encoded(base.convert("RGBA"), "DDS")),
        ("one_bit.xbm", "XBM (1-bit)", "ok", "", w, h, _encoded(base.convert("1"), "XBM")),
        ("IMG_0001", "JPEG without an extension (by content)", "ok", "", w, h, _jpeg(base)),
        ("scan.dat", "TIFF named .dat (by content)", "ok", "", w, h, _encoded(base, "TIFF")),
        ("png_named.jpg", "PNG named .jpg", "ok", "", w, h, _png(base)),
        ("notes.txt", "a text file (not an image by name or content)", "error", "not an image", None, None,
         b"shopping list: eggs, milk\n"),
    ]
    for feature, (name, kind, fmt) in OPTIONAL_CODECS.items():
        if features.check(feature):
            entries.append((name, kind, "ok", "", w, h, _encoded(base, fmt)))
    return entries


# Codecs Pillow may be built without: Pillow feature -> (file, kind, Pillow format). Without one, its
# file is left out of the corpus, and the maker says so (skipped_codecs, and the script's last lines).
OPTIONAL_CODECS = {"jpg_2000": ("wavelet.jp2", "JPEG 2000", "JPEG2000"), "avif": ("modern.avif", "AVIF", "AVIF")}
# Pillow formats of the files made whatever the build, and how many files that is.
ALWAYS_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM", "TGA", "ICO", "PCX", "SGI", "QOI",
                            "DDS", "XBM"})
ALWAYS_FILES = 43


def skipped_codecs() -> list[str]:
    """The optional codecs this Pillow lacks, as ``"AVIF (avif)"``: their files are not in the corpus."""
    return [f"{kind} ({feature})" for feature, (_, kind, _) in OPTIONAL_CODECS.items() if not features.check(feature)]


def formats_of(files: list[tuple[CorpusItem, bytes]]) -> set[str]:
    """The Pillow formats the corpus's readable files really are (read from their bytes)."""
    found = set()
    for item, data in files:
        if item.expect == "ok":
            with Image.open(io.BytesIO(data)) as img:
                found.add(img.format)
    return found


def expected_counts() -> tuple[int, frozenset[str]]:
    """(files, Pillow formats) the corpus holds on this machine: 45 files and 16 formats where Pillow has
    every optional codec."""
    present = [fmt for feature, (_, _, fmt) in OPTIONAL_CODECS.items() if features.check(feature)]
    return ALWAYS_FILES + len(present), ALWAYS_FORMATS | set(present)


def _exif_jpeg(orientation: int) -> bytes:
    stored = _canonical().transpose(_STORE_FOR_ORIENTATION[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _jpeg(stored, exif=exif.tobytes())


def image_corpus_files() -> list[tuple[CorpusItem, bytes]]:
    """(item, bytes) for every corpus entry; ids start at 900001."""
    base = _canonical()
    good = _jpeg(base)
    rgba = Image.new("RGBA", (48, 32), (10, 200, 30, 128))
    palette = Image.new("P", (40, 30), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.info["transparency"] = 0
    gray16 = Image.fromarray((np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16))
    frames = [Image.new("RGB", (32, 24), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    gif, webp_anim, webp_rgba = io.BytesIO(), io.BytesIO(), io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    frames[0].save(webp_anim, "WEBP", save_all=True, append_images=frames[1:], duration=100)
    rgba.save(webp_rgba, "WEBP", lossless=True)
    html = b"<!DOCTYPE html><html><head><title>503 Service Unavailable</title></head><body>Try later</body></html>\n"

    entries: list[tuple[str, str, str, str, int | None, int | None, bytes]] = [
        # name, kind, expect, reason word, width, height, bytes
        ("zero_bytes.jpg", "zero-byte file", "error", "empty", None, None, b""),
        ("truncated.jpg", "truncated JPEG (half the bytes)", "error", "truncated", None, None, good[: len(good) // 2]),
        ("bad_huffman.jpg", "JPEG with a corrupt Huffman table", "error", "huffman", None, None, _corrupt_huffman(good)),
        ("bad_crc.png", "PNG with a bad CRC", "error", "crc", None, None, _bad_crc_png(_png(base))),
        ("text.jpg", "a text file named .jpg", "error", "not an image", None, None, b"just some text, not pixels\n" * 4),
        ("error_page.jpg", "an HTML error page named .jpg", "error", "html", None, None, html),
        ("cmyk.jpg", "CMYK JPEG", "ok", "", 60, 40, _jpeg(base.convert("CMYK"))),
        ("gray16.png", "16-bit grayscale PNG", "ok", "", 64, 48, _png(gray16)),
        ("gray.jpg", "8-bit grayscale JPEG", "ok", "", 60, 40, _jpeg(base.convert("L"))),
        ("palette_alpha.png", "palette PNG with transparency", "ok", "", 40, 30, _png(palette)),
        ("rgba.webp", "RGBA WEBP", "ok", "", 48, 32, webp_rgba.getvalue()),
        ("animated.gif", "animated GIF (first frame used)", "ok", "", 32, 24, gif.getvalue()),
        ("animated.webp", "animated WEBP (first frame used)", "ok", "", 32, 24, webp_anim.getvalue()),
        ("one_pixel.png", "a 1x1 image", "ok", "", 1, 1, _png(Image.new("RGB", (1, 1), (9, 9, 9)))),
        ("wide_20000x50.jpg", "20000x50 image", "ok", "", 20000, 50, _jpeg(Image.new("RGB", (20000, 50), (90, 120, 30)))),
        ("tall_50x20000.jpg", "50x20000 image", "ok", "", 50, 20000, _jpeg(Image.new("RGB", (50, 20000), (30, 120, 90)))),
        ("bomb.png", "decompression bomb (10^10 declared pixels)", "error", "decompression bomb", None, None, _bomb_png()),
        ("with space.jpg", "file name with spaces", "ok", "", 60, 40, good),
        ("ünïcödé_写真.jpg", "file name with unicode", "ok", "", 60, 40, good),
        ("..dots..jpg", "file name with '..'", "ok", "", 60, 40, good),
        ("-leading-dash.jpg", "file name with a leading dash", "ok", "", 60, 40, good),
    ]
    entries += [
        (f"exif_orientation_{o}.jpg", f"EXIF orientation {o}", "ok", "", 60, 40, _exif_jpeg(o)) for o in range(2, 9)
    ]
    entries += _other_formats(base)
    return [
        (CorpusItem(name, 900001 + i, kind, expect, word, w, h), data)
        for i, (name, kind, expect, word, w, h, data) in enumerate(entries)
    ]


def make_image_corpus(folder: str | Path, layout: str = "bucket") -> list[CorpusItem]:
    """Write the corpus; ``layout="bucket"`` keeps the odd names, ``"ava"`` names files ``<id>.jpg``."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    items = []
    for item, data in image_corpus_files():
        name = item.name if layout == "bucket" else f"{item.image_id}.jpg"
        (out / name).write_bytes(data)
        items.append(item)
    return items


def canonical_pixels() -> np.ndarray:
    """What every EXIF-oriented corpus image must look like once displayed."""
    return np.asarray(_canonical())


@dataclass(frozen=True)
class LabelLine:
    text: str
    expect: str  # "ok", "rejected" or "skip" (a blank line is not an image)
    reason_contains: str = ""


def label_corpus_lines() -> list[LabelLine]:
    """AVA label lines, broken in every way the parser must survive (CRLF endings on some)."""
    return [
        LabelLine("1 910001 0 1 5 17 38 36 15 6 5 1 1 22 1396", "ok"),
        LabelLine("2 910002 0 1 5 17 38 36 15 6 5 1 1 22 1396\r", "ok"),  # CRLF line ending
        LabelLine("3 910003 0 1 5 17 38 36", "rejected", "field"),  # too few fields
        LabelLine("4 910004 0 1 5 x7 38 36 15 6 5 1 1 22 1396", "rejected", "integer"),  # letters
        LabelLine("5 910005 0 1 -5 17 38 36 15 6 5 1 1 22 1396", "rejected", "negative"),
        LabelLine("6 910006 0 0 0 0 0 0 0 0 0 0 1 22 1396", "rejected", "no votes"),
        LabelLine("7 910001 1 1 1 1 1 1 1 1 1 1 0 0 1", "rejected", "duplicate"),
        LabelLine("8 910008 0 2 4 10 50 60 20 8 3 1 0 0 1396", "ok"),
        LabelLine("", "skip"),  # trailing blank line
    ]


def hostile_object_keys() -> list[tuple[str, str]]:
    """(object key, what it is): keys an attacker or a careless uploader can put in a bucket. Object
    stores take them literally; a path built from them naively would leave the output root."""
    return [
        ("../escape.jpg", "key starting with a '..' segment"),
        ("photos/../../escape-up.jpg", "key with '..' segments climbing above the prefix"),
        ("/absolute.jpg", "absolute key (leading slash)"),
        ("photos//double-slash.jpg", "empty path segment"),
        ("photos/./dot-segment.jpg", "'.' path segment"),
        ("photos/-rf.jpg", "name that looks like a command-line option"),
        ("photos/back\\slash.jpg", "backslash in the name"),
    ]


def make_label_corpus() -> str:
    return "\n".join(line.text for line in label_corpus_lines()) + "\n"


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "corpus")
    for it in make_image_corpus(target):
        print(f"{it.name:40s} {it.expect:6s} {it.kind}")
    made = image_corpus_files()
    print(f"{len(made)} files, {len(formats_of(made))} image formats")
    print(f"skipped (this Pillow lacks the codec): {', '.join(skipped_codecs()) or 'none'}")
    (target / "AVA.txt").write_text(make_label_corpus(), newline="")
