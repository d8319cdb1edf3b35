"""Image decoding: display orientation, colour modes to RGB, specific reasons for bad files, draft mode.

Expected pixels are built independently with NumPy (EXIF orientation by its definition, alpha
compositing by hand), not with the Pillow helpers the decoder itself uses.
"""

from __future__ import annotations

import io
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tasks.core import images
from tasks.core.images import ImageError, decode_image, decode_to_tensor, image_to_tensor, probe_image
from tests.corpus.make_corpus import canonical_pixels, image_corpus_files

ORIENTATION_TAG = 0x0112


def quadrants(width: int = 64, height: int = 32) -> np.ndarray:
    """(H, W, 3) uint8 with four flat colours; block sizes are multiples of 16 so JPEG keeps them."""
    arr = np.empty((height, width, 3), np.uint8)
    arr[: height // 2, : width // 2] = (230, 20, 20)
    arr[: height // 2, width // 2:] = (20, 230, 20)
    arr[height // 2:, : width // 2] = (20, 20, 230)
    arr[height // 2:, width // 2:] = (240, 240, 240)
    return arr


def encode(arr_or_img: np.ndarray | Image.Image, fmt: str = "JPEG", orientation: int | None = None,
           **kw: object) -> bytes:
    img = Image.fromarray(arr_or_img) if isinstance(arr_or_img, np.ndarray) else arr_or_img
    if orientation is not None:
        exif = Image.Exif()
        exif[ORIENTATION_TAG] = orientation
        kw["exif"] = exif.tobytes()
    if fmt == "JPEG":
        kw = {"quality": 95, "subsampling": 0, **kw}
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def displayed(stored: np.ndarray, orientation: int) -> np.ndarray:
    """EXIF 2.3's definition of each orientation value, applied to the stored (H, W, C) pixels."""
    return {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],  # mirrored left-right
        3: lambda a: a[::-1, ::-1],  # rotated 180
        4: lambda a: a[::-1, :],  # mirrored top-bottom
        5: lambda a: a.transpose(1, 0, 2),  # mirrored along the main diagonal
        6: lambda a: np.rot90(a, k=-1),  # stored rotated 90 CCW: display turns it 90 CW
        7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # mirrored along the anti-diagonal
        8: lambda a: np.rot90(a, k=1),  # display turns it 90 CCW
    }[orientation](stored)


def reason_of(data: bytes, **kw: object) -> ImageError:
    with pytest.raises(ImageError) as info:
        decode_image(data, **kw)
    return info.value


# ---- EXIF orientation ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_gives_displayed_size_and_pixels(orientation, fmt):
    stored = quadrants(64, 32)
    data = encode(stored, fmt, orientation=orientation)
    expected = displayed(stored, orientation)
    info = probe_image(data)
    assert info.orientation == orientation
    assert (info.raw_width, info.raw_height) == (64, 32)
    assert (info.height, info.width) == expected.shape[:2]
    assert info.aspect_ratio == pytest.approx(expected.shape[0] / expected.shape[1])
    assert info.raw_aspect_ratio == pytest.approx(0.5)
    out = np.asarray(decode_image(data))
    assert out.shape == expected.shape
    diff = np.abs(out.astype(int) - expected.astype(int))
    if fmt == "PNG":
        assert diff.max() == 0
    else:
        assert diff.mean() < 3 and diff.max() < 40


@pytest.mark.parametrize("bad", [0, 9, 300])
def test_out_of_range_orientation_is_ignored(bad):
    stored = quadrants()
    data = encode(stored, "PNG", orientation=bad)
    assert probe_image(data).orientation == 1
    assert np.array_equal(np.asarray(decode_image(data)), stored)


def test_orientation_and_draft_together():
    """Draft decoding happens on the stored pixels; the rotation still lands the right way up."""
    stored = np.kron(quadrants(8, 4), np.ones((64, 64, 1), np.uint8))  # 512 x 256, same quadrants
    data = encode(stored, "JPEG", orientation=6)
    out = np.asarray(decode_image(data, min_short_side=60))
    assert out.shape == (128, 64, 3)  # 1/4 scale of 256 x 512 displayed
    expected = displayed(np.kron(quadrants(8, 4), np.ones((16, 16, 1), np.uint8)), 6)
    assert np.abs(out.astype(int) - expected.astype(int)).mean() < 6


# ---- colour modes -> RGB --------------------------------------------------------------------------

def test_cmyk_jpeg_becomes_rgb():
    rgb = quadrants()
    out = decode_image(encode(Image.fromarray(rgb).convert("CMYK")))
    assert out.mode == "RGB"
    assert np.abs(np.asarray(out).astype(int) - rgb.astype(int)).mean() < 6


def test_16_bit_grayscale_is_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 64 * 16).reshape(16, 64).astype(np.uint16)
    img = Image.fromarray(ramp)
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    out = np.asarray(decode_image(data))
    assert out.dtype == np.uint8 and out.shape == (16, 64, 3)
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])
    expected = np.round(ramp / 65535.0 * 255.0)
    assert np.abs(out[..., 0].astype(int) - expected).max() <= 1
    assert out.min() == 0 and out.max() == 255  # the full range, not a clipped white image


def test_palette_with_transparency_composites_on_white():
    pal = Image.new("P", (32, 16), 0)
    pal.putpalette([0, 0, 0, 200, 30, 60] + [0] * 762)
    pal.paste(1, (16, 0, 32, 16))  # right half: opaque colour 1; left half: transparent index 0
    data = encode(pal, "PNG", transparency=0)
    out = np.asarray(decode_image(data))
    assert (out[:, :16] == 255).all()  # transparent -> white, not palette black
    assert (out[:, 16:] == (200, 30, 60)).all()


def test_rgba_and_la_composite_on_white():
    rgba = np.zeros((16, 48, 4), np.uint8)
    rgba[:, :16] = (200, 0, 0, 255)  # opaque red
    rgba[:, 16:32] = (200, 0, 0, 0)  # fully transparent
    rgba[:, 32:] = (0, 0, 100, 128)  # half-transparent dark blue
    out = np.asarray(decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))).astype(int)
    alpha = 128 / 255
    half = np.round(np.array([0, 0, 100]) * alpha + 255 * (1 - alpha))
    assert (out[:, :16] == (200, 0, 0)).all()
    assert (out[:, 16:32] == 255).all()
    assert np.abs(out[:, 32:] - half).max() <= 1
    la = Image.fromarray(np.dstack([np.full((8, 8), 40, np.uint8), np.zeros((8, 8), np.uint8)]), "LA")
    assert (np.asarray(decode_image(encode(la, "PNG"))) == 255).all()


@pytest.mark.parametrize("mode", ["L", "1", "P"])
def test_grayscale_and_other_modes_become_rgb(mode):
    gray = np.tile(np.linspace(0, 255, 32).astype(np.uint8), (8, 1))
    img = Image.fromarray(gray).convert(mode)
    out = decode_image(encode(img, "PNG"))
    assert out.mode == "RGB" and out.size == (32, 8)
    arr = np.asarray(out)
    assert np.array_equal(arr[..., 0], arr[..., 2])
    if mode == "L":
        assert np.array_equal(arr[..., 0], gray)


def test_grayscale_jpeg():
    gray = np.kron(np.array([[30, 220]], np.uint8), np.ones((16, 16), np.uint8))
    out = np.asarray(decode_image(encode(gray, "JPEG")))
    assert out.shape == (16, 32, 3)
    assert np.abs(out[..., 1].astype(int) - gray).max() < 10


def test_decode_to_tensor_layout():
    stored = quadrants()
    data = encode(stored, "PNG", orientation=8)
    tensor = decode_to_tensor(data)
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 64, 32)
    assert torch.equal(tensor, torch.from_numpy(displayed(stored, 8).copy()).permute(2, 0, 1))
    assert torch.equal(image_to_tensor(Image.fromarray(stored)), torch.from_numpy(stored).permute(2, 0, 1))


# ---- bad files: ImageError with a specific reason ------------------------------------------------

def test_empty_file():
    err = reason_of(b"")
    assert "empty" in err.reason and err.stage == "fetch"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("keep", [0.5, 0.9, 0.99])
def test_truncated_file(fmt, keep):
    data = encode(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8), fmt)
    cut = data[: int(len(data) * keep)]
    err = reason_of(cut)
    assert "truncated" in err.reason and err.stage == "decode"
    with pytest.raises(ImageError, match="truncated"):
        probe_image(cut)


def test_truncated_inside_header():
    data = encode(quadrants(), "JPEG")
    assert "truncated" in reason_of(data[:30]).reason or "not an image" in reason_of(data[:30]).reason


@pytest.mark.parametrize("trailer", [b"SEFT\x00\x01 phone trailer", b"\x00\x00\x00\x18ftypmp42" + bytes(6000)])
def test_data_after_the_jpeg_end_marker_is_not_truncation(trailer):
    """Phones append trailers and motion-photo videos after EOI: the picture itself is whole."""
    stored = quadrants()
    data = encode(stored, "JPEG") + trailer
    assert probe_image(data).width == 64
    assert np.abs(np.asarray(decode_image(data)).astype(int) - stored.astype(int)).mean() < 3


def test_truncation_found_behind_an_embedded_thumbnail():
    """An end marker inside a header segment (a thumbnail) does not hide a truncated main image."""
    thumbnail = encode(quadrants(16, 16), "JPEG")
    main = encode(np.random.default_rng(2).integers(0, 256, (64, 64, 3), dtype=np.uint8), "JPEG")
    comment = b"\xff\xfe" + (len(thumbnail) + 2).to_bytes(2, "big") + thumbnail
    whole = main[:2] + comment + main[2:]
    assert decode_image(whole).size == (64, 64)
    with pytest.raises(ImageError, match="truncated"):
        probe_image(whole[: len(whole) - 400])
    assert "truncated" in reason_of(whole[: len(whole) - 400]).reason


@pytest.mark.parametrize("data, word", [
    (b"just some text, not pixels\n" * 4, "not an image (unknown format)"),
    (bytes(range(256)) * 8, "not an image (unknown format)"),
    (b"<!DOCTYPE html><html><body>503</body></html>", "not an image (HTML page)"),
    (b"\n  <html><head><title>Forbidden</title></head></html>", "not an image (HTML page)"),
])
def test_non_images(data, word):
    err = reason_of(data)
    assert err.reason == word and err.stage == "decode"
    with pytest.raises(ImageError):
        probe_image(data)


def test_unsupported_format():
    # EPS would run Ghostscript on the file: Pillow identifies it, the decoder refuses it.
    data = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nshowpage\n%%EOF\n"
    assert "unsupported image format EPS" in reason_of(data).reason


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "PPM", "PCX", "SGI", "QOI", "TGA"])
def test_formats_beyond_the_web_ones_decode(fmt):
    img = decode_image(encode(Image.fromarray(quadrants()), fmt))
    assert img.mode == "RGB" and img.size == Image.fromarray(quadrants()).size


def test_pixel_limit(monkeypatch):
    data = encode(quadrants(64, 32), "PNG")
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    assert "decompression bomb" in reason_of(data).reason


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(["JPEG", "PNG", "GIF", "WEBP"]), st.data())
def test_damaged_bytes_never_raise_anything_but_image_error(fmt, data):
    """Random byte damage: a usable RGB image or an ImageError, never another exception."""
    clean = encode(np.random.default_rng(1).integers(0, 256, (24, 40, 3), dtype=np.uint8), fmt)
    damaged = bytearray(clean)
    for _ in range(data.draw(st.integers(1, 6))):
        damaged[data.draw(st.integers(0, len(damaged) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        damaged = damaged[: data.draw(st.integers(0, len(damaged)))]
    try:
        out = decode_image(bytes(damaged), min_short_side=data.draw(st.sampled_from([None, 8])))
    except ImageError as exc:
        assert exc.reason and exc.stage in ("fetch", "decode")
    else:
        assert out.mode == "RGB" and min(out.size) >= 1


def test_corpus_expectations_hold():
    """The shared bad-input corpus (tests/corpus): every item decodes or fails as it says."""
    canonical = canonical_pixels().astype(int)
    for item, data in image_corpus_files():
        if item.expect == "error":
            err = reason_of(data)
            assert item.reason_contains in err.reason.lower(), (item.name, err.reason)
            continue
        out = decode_image(data)
        assert out.mode == "RGB" and out.size == (item.width, item.height), item.name
        info = probe_image(data)
        assert (info.width, info.height) == (item.width, item.height), item.name
        if item.name.startswith("exif_orientation_"):
            assert np.abs(np.asarray(out).astype(int) - canonical).mean() < 4, item.name


# ---- draft mode -------------------------------------------------------------------------------------

@pytest.mark.parametrize("short_side", [63, 64, 127, 128, 129, 255, 256, 257, 511, 512, 513, 1024])
def test_draft_keeps_the_shorter_side_at_least_requested(short_side):
    request = 64
    gradient = np.linspace(0, 255, short_side).astype(np.uint8)
    stored = np.dstack([np.tile(gradient[:, None], (1, short_side + 40))] * 3)  # landscape
    data = encode(stored, "JPEG", quality=80)
    for arr_orientation in (None, 6):  # and as a portrait photo, via EXIF
        payload = data if arr_orientation is None else encode(stored, "JPEG", quality=80, orientation=6)
        out = decode_image(payload, min_short_side=request)
        got = min(out.size)
        assert got >= min(request, short_side)
        if short_side // request >= 2:  # a reduced scale was possible, and was used
            assert got <= math.ceil(short_side / 2)


def test_draft_ignored_for_png_and_when_not_asked():
    stored = np.zeros((200, 300, 3), np.uint8)
    assert decode_image(encode(stored, "PNG"), min_short_side=50).size == (300, 200)
    assert decode_image(encode(stored, "JPEG")).size == (300, 200)
    assert decode_image(encode(stored, "JPEG"), min_short_side=400).size == (300, 200)  # never upscales


@pytest.mark.slow
def test_draft_decodes_a_big_jpeg_in_little_memory(tmp_path):
    """A 4000 x 3000 JPEG asked for 342 px decodes at 1/8 scale: resident memory grows by well under
    the 36 MB a full RGB decode needs (measured in a fresh process, decode by decode)."""
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)
    big = Image.fromarray(small).resize((4000, 3000), Image.Resampling.BILINEAR)
    path = tmp_path / "big.jpg"
    path.write_bytes(encode(big, "JPEG", quality=85))
    script = textwrap.dedent(f"""
        import os
        from tasks.core.images import decode_image
        data = open({str(path)!r}, "rb").read()
        def rss_kib():  # resident memory now (the decoded images are still held)
            return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGESIZE") // 1024
        before = rss_kib()
        small = decode_image(data, min_short_side=342)
        after_draft = rss_kib()
        full = decode_image(data)
        after_full = rss_kib()
        print(small.size, full.size, after_draft - before, after_full - after_draft)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    draft_kib, full_kib = map(int, out.stdout.split()[-2:])
    assert "(500, 375)" in out.stdout  # 4000 x 3000 at 1/8: the shorter side 375 >= 342
    assert "(4000, 3000)" in out.stdout
    assert draft_kib < 8 * 1024, out.stdout  # a few MB at most (the 1/8 image is 0.6 MB)
    assert full_kib > 30 * 1024, out.stdout  # the control: a full decode does cost 36 MB


def _pillow_probe(data: bytes):
    """The reference: every header fact through Pillow (the slow path of probe_image)."""
    from tasks.core import images

    img = images._open(data)
    images._check_structure(data, img)
    orientation = images._orientation(img)
    raw_w, raw_h = img.size
    w, h = (raw_h, raw_w) if orientation in images._TRANSPOSED_ORIENTATIONS else (raw_w, raw_h)
    return images.ImageInfo(format=img.format, mode=img.mode, raw_width=raw_w, raw_height=raw_h,
                            orientation=orientation, width=w, height=h,
                            n_frames=int(getattr(img, "n_frames", 1)))


def _jpeg_variants() -> list[bytes]:
    import io

    from PIL import Image

    out = []
    base = Image.new("RGB", (97, 61), (120, 30, 200))
    for orientation in range(1, 9):
        exif = Image.Exif()
        exif[0x0112] = orientation
        for kwargs in ({}, {"progressive": True}, {"subsampling": 0}):
            buf = io.BytesIO()
            base.save(buf, "JPEG", exif=exif.tobytes(), **kwargs)
            out.append(buf.getvalue())
    for mode in ("L", "CMYK"):
        buf = io.BytesIO()
        base.convert(mode).save(buf, "JPEG")
        out.append(buf.getvalue())
    return out


def test_fast_jpeg_header_path_agrees_with_pillow():
    from tasks.core.images import _fast_jpeg_info
    from tests.corpus.make_corpus import image_corpus_files

    samples = _jpeg_variants() + [data for _, data in image_corpus_files()]
    taken = 0
    for data in samples:
        fast = _fast_jpeg_info(data)
        if fast is None:
            continue  # the fast path declined: probe_image falls back to Pillow
        taken += 1
        assert fast == _pillow_probe(data)
    assert taken >= len(_jpeg_variants())  # every plain JPEG above takes the fast path
