"""Image intake: real photographs, odd modes, animations, orientation, and hostile or broken files."""

from __future__ import annotations

import functools
import hashlib
import io
import json
import random
import re
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import EpsImagePlugin, GifImagePlugin, Image, ImageFile, PngImagePlugin, WebPImagePlugin
from skimage import data as skdata

from i2p2i_bot import images
from i2p2i_bot.config import IntakeSettings
from i2p2i_bot.images import (
    BACKGROUND_RGB,
    DAMAGED_IMAGE,
    EMPTY_FILE,
    NOT_AN_IMAGE,
    TOO_MUCH_MEMORY,
    UNREADABLE_VARIANT,
    ImageError,
    check_declared,
    check_image,
    image_sha256,
    load_intake,
    open_image,
)
from tests.fuzz_intake import (
    FUZZ_LIMITS,
    byte_mutation,
    check_intake,
    intake_outcome,
    jpeg_assemble,
    jpeg_segments,
    png_assemble,
    png_chunks,
    seed_corpus,
    structured_mutation,
    write_corpus,
)

# Every case must end, image or ImageError, well within this (they take milliseconds): a generous bound
# that turns a decoder stuck in a loop into a failure instead of a hung run.
pytestmark = pytest.mark.timeout(120)

GREY = BACKGROUND_RGB
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "astronaut": skdata.astronaut,
    "chelsea": skdata.chelsea,
    "coffee": skdata.coffee,
}
# Mean absolute difference per channel allowed after a round trip through each format.
TOLERANCE = {"PNG": 0.0, "BMP": 0.0, "TIFF": 0.0, "JPEG": 4.0, "WEBP": 4.0, "GIF": 6.0}


# --- builders ---------------------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def gradient(width: int = 16, height: int = 12) -> Image.Image:
    """A small RGB image whose every pixel differs, so misplaced pixels show."""
    values = (np.arange(width * height * 3) * 7 % 251).astype(np.uint8)
    return Image.fromarray(values.reshape(height, width, 3))


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_declaring(width: int, height: int, idat: bytes | None = None) -> bytes:
    """A tiny 8-bit greyscale PNG whose header claims width×height, with a few rows of compressed zeros."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    if idat is None:
        idat = zlib.compress(bytes(min(width, 100_000) + 1) * 16, 9)
    return (
        b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")
    )


def bmp_declaring(width: int, height: int) -> bytes:
    """A 24-bit BMP header claiming width×height, followed by 16 bytes of pixel data."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + 40 + 16, 0, 0, 54) + info + bytes(16)


def gif_bytes(
    screen: tuple[int, int],
    frames: list[tuple[int, int, int, int, int]],
    palette: tuple[tuple[int, int, int], ...] = ((255, 0, 0), (0, 0, 255)),
    disposal: int = 0,
) -> bytes:
    """A hand-built GIF: frames are (left, top, width, height, palette index), with 1-pixel LZW data each."""
    colours = list(palette) + [(0, 0, 0)] * (2 - len(palette))
    out = bytearray(b"GIF89a" + struct.pack("<HH", *screen) + bytes([0x80, 0, 0]))
    out += b"".join(bytes(c) for c in colours[:2])
    for left, top, width, height, index in frames:
        out += b"\x21\xf9\x04" + bytes([disposal << 2, 0, 0, 0]) + b"\x00"
        out += b"\x2c" + struct.pack("<HHHH", left, top, width, height) + b"\x00"
        # LZW, minimum code size 2, 3-bit codes: clear (4), the pixel's index, end (5).
        codes = 4 | index << 3 | 5 << 6
        out += b"\x02\x02" + codes.to_bytes(2, "little") + b"\x00"
    return bytes(out + b"\x3b")


def webp_declaring(width: int, height: int, kind: str = "VP8X") -> bytes:
    """The first 30 bytes of a WebP of the given kind (extended, lossy or lossless) sized width×height."""
    if kind == "VP8X":
        body = bytes(4) + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    elif kind == "VP8 ":
        body = b"\x10\x02\x00\x9d\x01\x2a" + struct.pack("<HH", width, height)
    else:
        body = b"\x2f" + ((width - 1) | (height - 1) << 14).to_bytes(4, "little") + b"\x00"
    chunk = kind.encode() + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def tiff_bytes(
    width: int,
    height: int,
    data: bytes,
    *,
    samples: int = 1,
    bits: int = 8,
    sample_format: int = 1,
    photometric: int = 1,
    extra_samples: tuple[int, ...] = (),
    order: str = "<",
) -> bytes:
    """An uncompressed one-strip TIFF built tag by tag, for layouts Pillow cannot write (16-bit RGB...).

    sample_format: 1 unsigned, 2 signed, 3 float; photometric: 1 grey, 2 RGB, 5 CMYK.
    """

    def build(strip_at: int) -> tuple[bytes, int]:
        tags = [
            (256, 4, [width]),
            (257, 4, [height]),
            (258, 3, [bits] * samples),
            (259, 3, [1]),
            (262, 3, [photometric]),
            (273, 4, [strip_at]),
            (277, 3, [samples]),
            (278, 4, [height]),
            (279, 4, [len(data)]),
            (284, 3, [1]),
            (339, 3, [sample_format] * samples),
        ]
        if extra_samples:
            tags.append((338, 3, list(extra_samples)))
        tags.sort()
        values_at = 8 + 2 + 12 * len(tags) + 4
        entries, values = bytearray(), bytearray()
        for tag, kind, numbers in tags:
            packed = b"".join(struct.pack(order + ("H" if kind == 3 else "I"), n) for n in numbers)
            if len(packed) <= 4:
                field = packed.ljust(4, b"\0")
            else:
                field = struct.pack(order + "I", values_at + len(values))
                values += packed
            entries += struct.pack(order + "HHI", tag, kind, len(numbers)) + field
        head = (b"II*\0" if order == "<" else b"MM\0*") + struct.pack(order + "I", 8)
        return head + struct.pack(order + "H", len(tags)) + entries + bytes(4) + values, values_at + len(
            values
        )

    _, strip_at = build(0)
    header, _ = build(strip_at)
    return header + data


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small valid JPEG whose frame header (SOF0) is rewritten to claim width×height."""
    segments, rest = jpeg_segments(encode(gradient(), "JPEG"))
    frame = [i for i, (marker, _) in enumerate(segments) if marker == 0xC0]
    body = bytearray(segments[frame[0]][1])
    struct.pack_into(">HH", body, 1, height, width)
    segments[frame[0]] = (0xC0, bytes(body))
    return jpeg_assemble(segments, rest)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.fixture
def forbid_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any call to Image.open fail the test, to prove a rejection happened before decoding began."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("Image.open was reached")

    monkeypatch.setattr(Image, "open", refuse)


@pytest.fixture
def forbid_load(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any pixel decoding fail the test, to prove a rejection came from the header alone."""

    def no_load(self: object) -> None:
        raise AssertionError("load() was reached")

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load", no_load)
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)


@pytest.fixture
def no_pillow_bomb_guard(monkeypatch: pytest.MonkeyPatch) -> None:
    """Switch off Pillow's global decompression-bomb limit, as an application elsewhere might."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)


# --- real photographs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"])
@pytest.mark.parametrize("name", sorted(PHOTOS))
def test_photographs_decode_to_rgb_close_to_the_source(name: str, fmt: str) -> None:
    """A real photograph saved in each allowed format comes back RGB, same size, close to the source."""
    source = PHOTOS[name]()
    options = {"quality": 90} if fmt in ("JPEG", "WEBP") else {}
    image = open_image(encode(Image.fromarray(source), fmt, **options))
    assert image.mode == "RGB"
    assert image.size == (source.shape[1], source.shape[0])
    assert np.abs(pixels(image) - source).mean() <= TOLERANCE[fmt]


def test_photographs_need_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """scikit-image's sample photographs load with sockets disabled, so these tests run offline."""

    def no_network(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr("socket.socket.connect", no_network)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    shapes = {name: load().shape for name, load in PHOTOS.items()}
    assert shapes == {"astronaut": (512, 512, 3), "chelsea": (300, 451, 3), "coffee": (400, 600, 3)}


def test_load_intake_reports_hash_format_and_size() -> None:
    """load_intake keeps the sha256 of the raw bytes, the detected format and the stored size."""
    data = encode(Image.fromarray(skdata.chelsea()), "JPEG")
    intake = load_intake(data)
    assert intake.sha256 == hashlib.sha256(data).hexdigest()
    assert intake.format == "JPEG"
    assert intake.original_size == (451, 300)
    assert intake.image.mode == "RGB" and intake.image.size == (451, 300)


def test_image_sha256_matches_hashlib() -> None:
    """image_sha256 is the hex SHA-256 of exactly the bytes given."""
    for data in (b"", b"abc", bytes(range(256)) * 100):
        assert image_sha256(data) == hashlib.sha256(data).hexdigest()


# --- animations -------------------------------------------------------------------------------------------


def colour_frames() -> list[Image.Image]:
    return [Image.new("RGB", (8, 6), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP"])
def test_animation_returns_first_frame(fmt: str) -> None:
    """An animated GIF, APNG or WebP yields its first frame's pixels."""
    first, *rest = colour_frames()
    options = {"lossless": True} if fmt == "WEBP" else {}
    data = encode(first, fmt, save_all=True, append_images=rest, duration=100, **options)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    image = open_image(data)
    assert image.mode == "RGB" and image.size == (8, 6)
    assert image.getpixel((4, 3)) == (255, 0, 0)


def test_multi_picture_jpeg_returns_its_first_picture() -> None:
    """A multi-picture JPEG (MPO, as some cameras write) is accepted as JPEG and yields its first picture."""
    first, second = Image.new("RGB", (8, 6), (255, 0, 0)), Image.new("RGB", (8, 6), (0, 0, 255))
    intake = load_intake(encode(first, "MPO", save_all=True, append_images=[second]))
    assert intake.format == "MPO"
    assert np.abs(pixels(intake.image)[3, 4] - (255, 0, 0)).max() <= 4


def many_frame_gif(frames: int) -> bytes:
    """A 1×1 GIF whose first frame is red and every later one blue."""
    return gif_bytes((1, 1), [(0, 0, 1, 1, 0)] + [(0, 0, 1, 1, 1)] * (frames - 1))


def test_gif_with_thousands_of_frames_reads_only_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 5000-frame GIF is answered from frame 0 alone; no later frame is ever parsed."""
    data = many_frame_gif(5000)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 5000
    seen: list[int] = []
    original = GifImagePlugin.GifImageFile._seek

    def record(self: GifImagePlugin.GifImageFile, frame: int, *args: Any) -> None:
        seen.append(frame)
        original(self, frame, *args)

    monkeypatch.setattr(GifImagePlugin.GifImageFile, "_seek", record)
    image = open_image(data)
    assert image.getpixel((0, 0)) == (255, 0, 0)
    assert seen == [0]


# --- modes and transparency ---------------------------------------------------------------------------------


def test_rgba_transparent_area_becomes_grey() -> None:
    """Fully transparent RGBA pixels become the grey background; half-transparent ones blend with it."""
    rgba = Image.new("RGBA", (4, 2), (255, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 255, 255))
    rgba.putpixel((2, 0), (255, 255, 255, 128))
    image = open_image(encode(rgba, "PNG"))
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == GREY
    assert image.getpixel((1, 0)) == (0, 0, 255)
    blended = pixels(image)[0, 2]
    assert np.abs(blended - (255 * 128 + 128 * 127) / 255).max() <= 1


def test_la_transparent_area_becomes_grey() -> None:
    """A greyscale+alpha PNG keeps its opaque grey levels and turns transparent areas mid-grey."""
    la = Image.new("LA", (2, 1), (0, 0))
    la.putpixel((1, 0), (200, 255))
    image = open_image(encode(la, "PNG"))
    assert image.getpixel((0, 0)) == GREY
    assert image.getpixel((1, 0)) == (200, 200, 200)


def test_palette_png_with_trns_uses_grey_for_the_transparent_index() -> None:
    """A palette PNG whose tRNS marks index 0 transparent shows grey there, palette colours elsewhere."""
    paletted = Image.new("P", (3, 1), 0)
    paletted.putpalette([255, 255, 255, 10, 200, 30] + [0] * 762)
    paletted.putpixel((2, 0), 1)
    data = encode(paletted, "PNG", transparency=0)
    assert b"tRNS" in data
    image = open_image(data)
    assert image.getpixel((0, 0)) == GREY
    assert image.getpixel((2, 0)) == (10, 200, 30)


def test_gif_transparent_index_becomes_grey() -> None:
    """A GIF's transparent colour index is composited onto grey, not shown as its palette colour."""
    paletted = Image.new("P", (2, 1), 0)
    paletted.putpalette([0, 0, 0, 250, 250, 0] + [0] * 762)
    paletted.putpixel((1, 0), 1)
    image = open_image(encode(paletted, "GIF", transparency=0))
    assert image.getpixel((0, 0)) == GREY
    assert image.getpixel((1, 0)) == (250, 250, 0)


def test_cmyk_jpeg_becomes_rgb_of_the_same_colour() -> None:
    """A CMYK JPEG of pure cyan decodes to RGB close to (0, 255, 255), and CMYK white to white."""
    cmyk = Image.new("CMYK", (16, 16), (255, 0, 0, 0))
    cmyk.paste((0, 0, 0, 0), (8, 0, 16, 16))
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    image = open_image(data)
    assert image.mode == "RGB"
    assert np.abs(pixels(image.crop((0, 0, 6, 16))) - (0, 255, 255)).max() <= 4
    assert np.abs(pixels(image.crop((10, 0, 16, 16))) - (255, 255, 255)).max() <= 4


def test_sixteen_bit_greyscale_png_is_scaled_not_clipped() -> None:
    """A 16-bit greyscale PNG (mode I;16) maps 0..65535 onto 0..255, where Pillow's convert would clip."""
    values = np.array([[0, 1000, 25700, 65535]], dtype=np.uint16)
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert Image.open(io.BytesIO(data)).convert("L").getpixel((1, 0)) == 255  # the pitfall avoided
    image = open_image(data)
    assert [image.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (4, 4, 4), (100, 100, 100), (255,) * 3]


def test_sixteen_bit_png_colour_key_becomes_grey() -> None:
    """A 16-bit greyscale PNG whose tRNS names one sample value shows grey where that value is."""
    values = np.array([[0, 1000, 65535]], dtype=np.uint16)
    image = open_image(encode(Image.fromarray(values), "PNG", transparency=1000))
    assert [image.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), GREY, (255, 255, 255)]


def test_float_tiff_is_stretched_by_its_own_range() -> None:
    """A float (mode F) TIFF maps its finite min..max onto 0..255; NaN counts as the min, +inf as the max."""
    values = np.array([[-1.0, 0.0, 1.0, 3.0, np.nan, np.inf]], dtype=np.float32)
    data = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    image = open_image(data)
    assert pixels(image)[0, :, 0].tolist() == [0, 64, 128, 255, 0, 255]
    assert image.mode == "RGB"


def test_flat_float_tiff_keeps_its_value() -> None:
    """A float image with one value everywhere has no range to stretch and reads as that value, clipped."""
    image = open_image(encode(Image.fromarray(np.full((2, 2), 42.4, dtype=np.float32)), "TIFF"))
    assert image.getpixel((1, 1)) == (42, 42, 42)


def test_32_bit_integer_tiff_is_stretched_by_its_own_range() -> None:
    """A 32-bit integer (mode I) TIFF maps its min..max onto 0..255."""
    values = np.array([[-70_000, 0, 70_000]], dtype=np.int32)
    data = encode(Image.fromarray(values), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert pixels(open_image(data))[0, :, 0].tolist() == [0, 128, 255]


def test_cmyk_tiff_becomes_rgb_of_the_same_colour() -> None:
    """A CMYK TIFF (Pillow's own and a hand-built one) turns cyan into cyan and full black into black."""
    cmyk = Image.new("CMYK", (4, 4), (255, 0, 0, 0))
    assert pixels(open_image(encode(cmyk, "TIFF")))[0, 0].tolist() == [0, 255, 255]
    built = tiff_bytes(2, 1, bytes([255, 0, 0, 0, 0, 0, 0, 255]), samples=4, photometric=5)
    assert Image.open(io.BytesIO(built)).mode == "CMYK"
    image = open_image(built)
    assert [image.getpixel((x, 0)) for x in range(2)] == [(0, 255, 255), (0, 0, 0)]


def test_lab_tiff_becomes_rgb() -> None:
    """A CIELAB TIFF decodes to RGB: full lightness is white, none is black, positive a* is red."""
    colours = {(255, 128, 128): "white", (0, 128, 128): "black", (128, 200, 128): "red"}
    for lab, name in colours.items():
        data = encode(Image.new("LAB", (2, 2), lab), "TIFF")
        assert Image.open(io.BytesIO(data)).mode == "LAB"
        pixel = open_image(data).getpixel((1, 1))
        assert isinstance(pixel, tuple)
        red, green, blue = pixel
        if name == "white":
            assert min(red, green, blue) >= 250
        elif name == "black":
            assert max(red, green, blue) <= 5
        else:
            assert red > 200 and green < 60 and blue < 150


@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
def test_sixteen_bit_greyscale_tiff_is_scaled_in_either_byte_order(order: str) -> None:
    """A 16-bit greyscale TIFF (I;16 or I;16B) maps 0..65535 onto 0..255 like a 16-bit PNG."""
    values = np.array([0, 1000, 25700, 65535], dtype=order + "u2")
    data = tiff_bytes(4, 1, values.tobytes(), bits=16, order=order)
    assert Image.open(io.BytesIO(data)).mode == ("I;16" if order == "<" else "I;16B")
    image = open_image(data)
    assert [image.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (4, 4, 4), (100, 100, 100), (255,) * 3]


def test_sixteen_bit_rgb_and_rgba_tiffs_keep_their_colours() -> None:
    """16-bit RGB and RGBA TIFFs come back as 8-bit RGB within one level of value/257, alpha onto grey."""
    rgb = np.array([[[0, 1000, 65535], [25700, 51400, 12850]]], dtype="<u2")
    image = open_image(tiff_bytes(2, 1, rgb.tobytes(), samples=3, bits=16, photometric=2))
    assert np.abs(pixels(image) - rgb / 257).max() <= 1
    rgba = np.array([[[65535, 0, 0, 0], [0, 65535, 0, 65535]]], dtype="<u2")
    data = tiff_bytes(2, 1, rgba.tobytes(), samples=4, bits=16, photometric=2, extra_samples=(2,))
    image = open_image(data)
    assert [image.getpixel((x, 0)) for x in range(2)] == [GREY, (0, 255, 0)]


def test_signed_sixteen_bit_tiff_is_stretched_by_its_own_range() -> None:
    """A signed 16-bit TIFF (Pillow's mode I) maps its min..max onto 0..255."""
    values = np.array([-32768, 0, 32767], dtype="<i2")
    data = tiff_bytes(3, 1, values.tobytes(), bits=16, sample_format=2)
    assert Image.open(io.BytesIO(data)).mode == "I"
    assert pixels(open_image(data))[0, :, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize(
    ("samples", "bits", "dtype"),
    [(3, 32, np.float32), (1, 64, np.float64), (1, 16, np.float16)],
    ids=["float32-rgb", "float64-grey", "float16-grey"],
)
def test_float_tiffs_pillow_cannot_decode_name_their_format(samples: int, bits: int, dtype: Any) -> None:
    """Float layouts Pillow has no mode for are refused with a sentence that says the TIFF is the problem."""
    photometric = 2 if samples == 3 else 1
    data = tiff_bytes(
        2,
        1,
        np.zeros(2 * samples, dtype).tobytes(),
        samples=samples,
        bits=bits,
        sample_format=3,
        photometric=photometric,
    )
    with pytest.raises(ImageError) as caught:
        open_image(data)
    assert str(caught.value) == UNREADABLE_VARIANT.format(kind="TIFF")


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "GIF"])
def test_one_bit_image_is_black_and_white(fmt: str) -> None:
    """A 1-bit image decodes to pure black and pure white RGB pixels."""
    bilevel = Image.new("1", (9, 3), 0)
    bilevel.putpixel((8, 2), 1)
    image = open_image(encode(bilevel, fmt))
    assert image.mode == "RGB" and image.size == (9, 3)
    assert image.getpixel((0, 0)) == (0, 0, 0)
    assert image.getpixel((8, 2)) == (255, 255, 255)


def test_greyscale_and_one_pixel_images() -> None:
    """An L-mode image becomes RGB with equal channels, and a 1×1 image is accepted."""
    assert open_image(encode(Image.new("L", (1, 1), 77), "PNG")).getpixel((0, 0)) == (77, 77, 77)
    one = open_image(encode(Image.new("RGB", (1, 1), (1, 2, 3)), "BMP"))
    assert one.size == (1, 1) and one.getpixel((0, 0)) == (1, 2, 3)


# --- orientation ------------------------------------------------------------------------------------------


def marked(width: int = 40, height: int = 20) -> Image.Image:
    """A black image with a red top-left corner, to see where rotation puts it."""
    image = Image.new("RGB", (width, height))
    image.paste((255, 0, 0), (0, 0, 8, 8))
    return image


def orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif.tobytes()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_exif_orientation_6_rotates_the_picture(fmt: str) -> None:
    """EXIF orientation 6 (turn 90° clockwise) swaps width and height and moves top-left to top-right."""
    options = {"lossless": True} if fmt == "WEBP" else {}
    image = open_image(encode(marked(), fmt, exif=orientation(6), **options))
    assert image.size == (20, 40)
    assert np.abs(pixels(image)[2, 17] - (255, 0, 0)).max() <= 20
    assert np.abs(pixels(image)[2, 2]).max() <= 20


def test_tiff_orientation_is_applied_exactly_once() -> None:
    """A TIFF's own orientation tag, which Pillow applies while loading, is not applied a second time."""
    image = open_image(encode(marked(), "TIFF", tiffinfo={0x0112: 6}))
    assert image.size == (20, 40)
    assert image.getpixel((17, 2)) == (255, 0, 0)
    assert image.getpixel((2, 2)) == (0, 0, 0)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize(
    "exif",
    [
        b"Exif\x00\x00garbage",
        b"not exif at all",
        b"Exif\x00\x00MM\x00\x2a\x00\x00\x00\x08\x00\x05\x01\x12",
        b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x06\x00",
        b"Exif\x00\x00II*\x00\xff\xff\xff\x7f",
    ],
)
def test_broken_exif_is_ignored(exif: bytes) -> None:
    """Unparseable EXIF leaves the image as stored instead of rejecting it."""
    image = open_image(encode(marked(), "JPEG", exif=exif))
    assert image.size == (40, 20)
    assert np.abs(pixels(image)[2, 2] - (255, 0, 0)).max() <= 20


EXIF_LOOP = (  # an IFD whose Exif sub-IFD pointer points back at itself
    b"II*\x00\x08\x00\x00\x00" + struct.pack("<H", 1) + struct.pack("<HHII", 0x8769, 4, 1, 8) + bytes(4)
)
EXIF_HUGE_COUNT = b"II*\x00\x08\x00\x00\x00" + struct.pack("<H", 0xFFFF) + bytes(40)
EXIF_GIANT_VALUE = (  # one ASCII entry claiming 2 GB of text
    b"II*\x00\x08\x00\x00\x00"
    + struct.pack("<H", 1)
    + struct.pack("<HHII", 0x010E, 2, 0x7FFFFFFF, 26)
    + bytes(4)
)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data", "ignore::UserWarning")
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize(
    "exif",
    [
        EXIF_LOOP,
        EXIF_HUGE_COUNT,
        EXIF_GIANT_VALUE,
        b"MM\x00*\xff\xff\xff\xff",
        orientation(0),
        orientation(9),
        orientation(65535),
        b"garbage exif",
    ],
    ids=[
        "ifd-loop",
        "huge-count",
        "giant-value",
        "offset-past-end",
        "orient-0",
        "orient-9",
        "orient-65535",
        "junk",
    ],
)
@pytest.mark.timeout(30)
def test_hostile_exif_leaves_the_picture_as_stored(fmt: str, exif: bytes) -> None:
    """EXIF that loops, lies about its size or names no valid orientation leaves the picture unrotated."""
    options = {"lossless": True} if fmt == "WEBP" else {}
    payload = b"Exif\x00\x00" + exif if fmt == "JPEG" else exif
    image = open_image(encode(marked(), fmt, exif=payload, **options))
    assert image.size == (40, 20)
    assert np.abs(pixels(image)[2, 2] - (255, 0, 0)).max() <= 20
    assert np.abs(pixels(image)[17, 37]).max() <= 20


# --- broken and hostile files -------------------------------------------------------------------------------


def rejection_sentences(fmt: str) -> set[str]:
    """What a damaged file of this format may be told: damaged, or (cut inside its header) unreadable."""
    kind = {"WEBP": "WebP", "MPO": "JPEG", "APNG": "PNG"}.get(fmt.upper(), fmt.upper())
    return {DAMAGED_IMAGE, UNREADABLE_VARIANT.format(kind=kind)}


# Every sentence open_image may end with: the fixed ones, and the limit sentences with their numbers.
FIXED_SENTENCES = {NOT_AN_IMAGE, EMPTY_FILE, DAMAGED_IMAGE, TOO_MUCH_MEMORY} | {
    UNREADABLE_VARIANT.format(kind=kind) for kind in ("PNG", "JPEG", "GIF", "WebP", "TIFF", "BMP")
}
_BYTES = r"[\d.]+ (?:MB|KB|bytes)"
_PIXELS = r"[\d,]+(?:\.\d)? (?:megapixels|pixels)"
LIMIT_SENTENCE = re.compile(
    rf"That file is {_BYTES}; the limit is {_BYTES}\."
    rf"|That image is \d+×\d+ pixels; the limit is {_PIXELS}\."
    rf"|That image is \d+×\d+ pixels; the longest side allowed is \d+ pixels\."
    rf"|That image is about {_PIXELS}; the limit is {_PIXELS}\."
    rf"|That image has too many pixels; the limit is {_PIXELS}\."
)


def is_limit_sentence(message: str) -> bool:
    return LIMIT_SENTENCE.fullmatch(message) is not None


def test_known_sentences_cover_every_refusal_and_nothing_else() -> None:
    """The sentence check the corpus tests rely on accepts each refusal intake makes and rejects others."""
    refusals = [
        (b"", None),
        (bytes(2048), IntakeSettings(max_bytes=1024)),
        (png_declaring(30000, 30000), None),
        (encode(Image.new("L", (1, 65000)), "PNG"), None),
        (bmp_declaring(30000, 30000), None),
        (b"\x89PNG\r\n\x1a\n", None),
        (b"text", None),
    ]
    for data, limits in refusals:
        with pytest.raises(ImageError) as caught:
            open_image(data, limits or images.DEFAULT_LIMITS)
        message = str(caught.value)
        assert message in FIXED_SENTENCES or is_limit_sentence(message), message
    for other in ("That image is fine.", "Traceback (most recent call last):", DAMAGED_IMAGE + " Sorry."):
        assert other not in FIXED_SENTENCES and not is_limit_sentence(other)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("fraction", [0.0005, 0.01, 0.1, 0.5, 0.9, 0.99])
def test_truncated_files_are_rejected(fmt: str, fraction: float) -> None:
    """A photograph cut short anywhere from header to near the end is an ImageError, not a partial image."""
    data = encode(Image.fromarray(skdata.coffee()), fmt)
    cut = max(1, int(len(data) * fraction))
    with pytest.raises(ImageError) as caught:
        open_image(data[:cut])
    assert str(caught.value) in rejection_sentences(fmt) | {NOT_AN_IMAGE}


def test_jpeg_missing_only_its_end_marker_is_rejected() -> None:
    """Pillow treats a JPEG without its final EOI marker as truncated; intake reports it as damaged."""
    data = encode(gradient(), "JPEG")
    assert data.endswith(b"\xff\xd9")
    with pytest.raises(ImageError, match="damaged or incomplete"):
        open_image(data[:-2])


SEED_FILES: dict[str, bytes] = {
    "PNG": encode(gradient(), "PNG"),
    "JPEG": encode(gradient(), "JPEG"),
    "GIF": encode(gradient(), "GIF"),
    "BMP": encode(gradient(), "BMP"),
    "WEBP": encode(gradient(), "WEBP"),
    "TIFF": encode(gradient(), "TIFF"),
    "APNG": encode(gradient(), "PNG", save_all=True, append_images=[gradient().rotate(180)]),
}
# Every allowed format's main variants: palette, 16-bit, interlaced, animated, progressive, CMYK, LZW...
HOSTILE_SEEDS = seed_corpus()


def rgb_or_image_error(data: bytes, limits: IntakeSettings = images.DEFAULT_LIMITS) -> str:
    """Decode and report which of the two allowed outcomes happened; any other exception propagates.

    An ImageError must be one sentence; an image must be RGB and carry none of the upload's metadata.
    """
    return check_intake(data, limits)


def cut_offsets(length: int) -> list[int]:
    """Every offset inside the first 64 bytes (the headers), 48 spread over the body, and the last 16."""
    spread = {1 + (length - 2) * i // 47 for i in range(48)}
    return sorted(({*range(1, 65), *spread, *range(length - 16, length)}) & set(range(1, length)))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", sorted(HOSTILE_SEEDS))
@pytest.mark.timeout(60)
def test_truncation_at_any_offset_gives_the_whole_picture_or_image_error(name: str) -> None:
    """Each format cut at ~130 offsets: an ImageError naming the damage, or exactly the full file's pixels.

    A file may legally end early (a GIF without its trailer, an APNG or MPO after its first picture);
    then the first picture must be complete, never half-decoded rows.
    """
    data = HOSTILE_SEEDS[name]
    whole = pixels(open_image(data))
    errors = 0
    for cut in cut_offsets(len(data)):
        try:
            image = open_image(data[:cut])
        except ImageError as exc:
            errors += 1
            assert str(exc) in rejection_sentences(name.split("-")[0]) | {NOT_AN_IMAGE}, (cut, str(exc))
            continue
        assert np.array_equal(pixels(image), whole), f"cut at {cut} of {len(data)} gave a partial picture"
    assert errors >= 64  # at least every cut inside the headers was refused


def header_bit_flips(data: bytes, length: int = 48) -> list[tuple[int, bytes]]:
    """Every single-bit change within the first `length` bytes, with the position of the changed byte."""
    flips = []
    for position in range(min(length, len(data))):
        for bit in range(8):
            mutated = bytearray(data)
            mutated[position] ^= 1 << bit
            flips.append((position, bytes(mutated)))
    return flips


# The bytes by which each format is recognised; a file with any of them changed is no longer that format.
SIGNATURE_BYTES: dict[str, tuple[int, ...]] = {
    "png": tuple(range(8)),
    "apng": tuple(range(8)),
    "jpeg": tuple(range(3)),
    "mpo": tuple(range(3)),
    "gif": tuple(range(6)),
    "bmp": tuple(range(2)),
    "webp": (*range(4), *range(8, 12)),  # RIFF, then WEBP after the size
    "tiff": tuple(range(4)),
}


def png_checksummed_bytes(data: bytes) -> set[int]:
    """Positions covered by the CRCs Pillow verifies: type, body and CRC of each chunk before the first IDAT.

    Pillow stops checking at the image data (the decoder reads IDAT), and a length field is not covered.
    """
    covered: set[int] = set()
    pos = 8
    while pos + 12 <= len(data) and data[pos + 4 : pos + 8] != b"IDAT":
        (length,) = struct.unpack_from(">I", data, pos)
        covered.update(range(pos + 4, pos + 12 + length))
        pos += 12 + length
    return covered


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("name", sorted(HOSTILE_SEEDS))
@pytest.mark.timeout(60)
def test_header_bit_flips_give_an_image_or_image_error(name: str) -> None:
    """Each bit of the first 48 bytes flipped: this format's refusal sentence, or an RGB image in the limits.

    A flip in the signature, or in a PNG chunk whose CRC Pillow checks, is always refused. Every other
    format has header fields a decoder can do without (JFIF density, BMP's reserved bytes, GIF palette
    entries), so some of its flips still give a picture; a change that refused them all would show here.
    """
    data = HOSTILE_SEEDS[name]
    fmt = name.split("-")[0]
    protected = set(SIGNATURE_BYTES[fmt])
    if fmt in ("png", "apng"):
        protected |= png_checksummed_bytes(data)
    limits = images.DEFAULT_LIMITS
    refusals = rejection_sentences(fmt) | {NOT_AN_IMAGE}
    pictures = 0
    for position, mutated in header_bit_flips(data):
        outcome = intake_outcome(mutated, limits)
        if isinstance(outcome, str):
            assert outcome in refusals or is_limit_sentence(outcome), (position, outcome)
            continue
        pictures += 1
        assert position not in protected, f"a flip at byte {position} was accepted"
        width, height = outcome.size
        assert width * height <= limits.max_pixels and max(width, height) <= limits.max_side, outcome.size
    if fmt not in ("png", "apng"):
        assert pictures > 0


@pytest.mark.parametrize(
    "data",
    [
        b"hello, this is a text file\n" * 10,
        b"<!DOCTYPE html><html><body><img src=x></body></html>",
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>',
        b'<svg xmlns="http://www.w3.org/2000/svg"><rect width="10" height="10"/></svg>',
        b"\x00" * 64,
        b"PK\x03\x04" + bytes(60),
        b"BMW is a car maker" * 4,
    ],
    ids=["text", "html", "svg-xml", "svg", "zeros", "zip", "text-starting-bm"],
)
def test_files_that_are_not_images_are_rejected(data: bytes) -> None:
    """Text, HTML, SVG and other non-images get the "not an image" sentence whatever the file was called."""
    with pytest.raises(ImageError) as caught:
        open_image(data)
    assert str(caught.value) == NOT_AN_IMAGE
    assert "PNG, JPEG, WebP, GIF, BMP or TIFF" in NOT_AN_IMAGE


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")
@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"\x89PNG\r\n\x1a\n", "PNG"),
        (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 3, 9, 0, 0, 0)), "PNG"),
        (b"\xff\xd8\xff\xe0" + bytes(40), "JPEG"),
        (b"GIF89a", "GIF"),
        (b"RIFF\x20\x00\x00\x00WEBPJUNK" + bytes(20), "WebP"),
        (b"II*\x00\xff\xff\xff\x00", "TIFF"),
        (b"MM\x00*\x00\x00\x00\x08\x00\x00", "TIFF"),
        (b"BM" + bytes(12) + b"\xff" * 40, "BMP"),
    ],
    ids=["png-signature", "png-bad-ihdr", "jpeg", "gif", "webp", "tiff-le", "tiff-be", "bmp"],
)
def test_broken_header_of_an_allowed_format_names_that_format(data: bytes, kind: str) -> None:
    """Bytes that start like an allowed format but that no decoder takes say which format they claim."""
    with pytest.raises(ImageError) as caught:
        open_image(data)
    assert str(caught.value) == UNREADABLE_VARIANT.format(kind=kind)


class StarvedDecoder:
    """A Pillow decoder whose decode() fails as a real one does when its buffers cannot be allocated."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def decode(self, buffer: bytes) -> tuple[int, int]:
        raise MemoryError


@pytest.mark.parametrize("name", ["png", "png-16bit", "jpeg", "gif", "bmp", "tiff", "tiff-lzw"])
def test_memory_running_out_in_the_decoder_has_its_own_sentence(
    name: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A MemoryError from the pixel decoder is told as needing more memory, not as a damaged file."""
    real = Image._getdecoder
    monkeypatch.setattr(Image, "_getdecoder", lambda *args: StarvedDecoder(real(*args)))
    with pytest.raises(ImageError) as caught:
        open_image(HOSTILE_SEEDS[name])
    assert str(caught.value) == TOO_MUCH_MEMORY
    assert isinstance(caught.value.__cause__, MemoryError)
    assert "out of memory" in caplog.text  # the operator hears of it too


@pytest.mark.parametrize("stage", ["open", "convert"])
def test_memory_running_out_while_opening_or_converting_has_its_own_sentence(
    stage: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Out of memory while opening (GIF and WebP allocate a canvas there) or converting: the same sentence."""

    def starved(*args: object, **kwargs: object) -> None:
        raise MemoryError

    if stage == "open":
        monkeypatch.setattr(Image, "open", starved)
    else:
        monkeypatch.setattr(images, "_to_rgb", starved)
    for data in (HOSTILE_SEEDS["gif"], HOSTILE_SEEDS["webp"], HOSTILE_SEEDS["png"]):
        with pytest.raises(ImageError) as caught:
            open_image(data)
        assert str(caught.value) == TOO_MUCH_MEMORY


# --- colour profiles, metadata and polyglots ---------------------------------------------------------------

OPAQUE = (10, 200, 30)


def with_png_chunk(data: bytes, kind: bytes, body: bytes) -> bytes:
    """The PNG with one more chunk (valid length and CRC) straight after IHDR."""
    chunks, tail = png_chunks(data)
    return png_assemble([chunks[0], (kind, body), *chunks[1:]], tail)


def with_jpeg_segment(data: bytes, marker: int, body: bytes, count: int = 1) -> bytes:
    """The JPEG with `count` copies of one more marker segment straight after SOI."""
    segments, rest = jpeg_segments(data)
    return jpeg_assemble([(marker, body)] * count + segments, rest)


def flat(fmt: str) -> bytes:
    return encode(Image.new("RGB", (8, 8), OPAQUE), fmt, **({"quality": 95} if fmt == "JPEG" else {}))


ICC_ZLIB_BOMB = b"icc\x00\x00" + zlib.compress(bytes(50_000_000), 9)  # inflates past Pillow's 1 MB cap


@pytest.mark.parametrize(
    "iccp",
    [
        b"icc\x00\x00" + zlib.compress(b"\x00\x00\x01\x00 this is no ICC profile" * 20),
        b"icc\x00\x00" + b"not zlib at all",
        b"icc\x00\x05" + zlib.compress(b"profile"),  # unknown compression method
        b"icc-profile-name-without-its-terminator" * 3,
        ICC_ZLIB_BOMB,
        b"",
    ],
    ids=["not-a-profile", "not-zlib", "unknown-method", "no-terminator", "zlib-bomb", "empty"],
)
@pytest.mark.timeout(30)
def test_png_with_a_broken_icc_profile_still_decodes(iccp: bytes) -> None:
    """A garbage iCCP chunk is ignored (intake applies no profiles): the pixels come back as stored."""
    data = with_png_chunk(flat("PNG"), b"iCCP", iccp)
    tracemalloc.start()
    try:
        image = open_image(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert image.size == (8, 8) and np.all(pixels(image) == OPAQUE)
    assert peak < 16 * 2**20  # the 50 MB zlib bomb is never inflated
    assert image.info == {}


@pytest.mark.parametrize(
    ("body", "count"),
    [
        (b"ICC_PROFILE\x00\x01\x01" + b"garbage" * 10, 1),
        (b"ICC_PROFILE\x00\x03\x02" + b"chunk three of two", 1),
        (b"ICC_PROFILE\x00\x00\x00" + b"chunk zero of zero", 1),
        (b"ICC_PROFILE\x00\x01\x02" + b"same chunk twice", 2),
        (b"ICC_PROFILE\x00", 1),  # cut short before its sequence numbers
        (b"ICC_PROFILE\x00\x01", 1),
        (b"ICC_", 1),
    ],
    ids=["garbage", "seq-past-count", "seq-zero", "duplicate", "no-seq", "half-seq", "short-name"],
)
def test_jpeg_with_a_broken_icc_segment_still_decodes(body: bytes, count: int) -> None:
    """Broken APP2 ICC_PROFILE segments are ignored: the pixels come back as stored."""
    image = open_image(with_jpeg_segment(flat("JPEG"), 0xE2, body, count))
    assert image.size == (8, 8)
    assert np.abs(pixels(image) - OPAQUE).max() <= 3
    assert image.info == {}


def test_icc_stripping_leaves_other_failures_alone(forbid_load: None) -> None:
    """A PNG broken for another reason as well as its profile keeps its own sentence after the retry."""
    ihdr = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 3, 9, 0, 0, 0))  # no such bit depth
    broken = with_png_chunk(b"\x89PNG\r\n\x1a\n" + ihdr, b"iCCP", b"icc\x00\x05")
    with pytest.raises(ImageError) as caught:
        open_image(broken)
    assert str(caught.value) == UNREADABLE_VARIANT.format(kind="PNG")


PHP = b"<?php system($_GET['c']); ?>"
GIF_JS = b"GIF89a/*" + encode(Image.new("P", (8, 8), 1), "GIF")[8:] + b"*/=1;alert(document.domain);"


def png_with_text(text: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", text)
    info.add_text("Packed", text, zip=True)
    return encode(Image.new("RGB", (8, 8), OPAQUE), "PNG", pnginfo=info)


@pytest.mark.parametrize(
    "data",
    [
        flat("PNG") + b"PK\x03\x04" + bytes(26) + b"PK\x05\x06" + bytes(18),
        flat("PNG") + b"<html><script>alert(1)</script></html>",
        png_with_text(PHP.decode()),
        encode(Image.new("RGB", (8, 8), OPAQUE), "JPEG", quality=95, comment=PHP),
        flat("JPEG") + PHP,
        flat("JPEG") + b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
        flat("GIF") + b"<script>alert(1)</script>",
    ],
    ids=["png+zip", "png+html", "png-php-text", "jpeg-php-comment", "jpeg+php", "jpeg+pdf", "gif+html"],
)
def test_polyglots_decode_to_their_picture_without_the_payload(data: bytes) -> None:
    """An image with a ZIP, HTML, PHP or PDF riding along decodes to its pixels; the payload is dropped."""
    image = open_image(data)
    assert image.size == (8, 8)
    assert np.abs(pixels(image) - OPAQUE).max() <= 3
    assert image.info == {}


def test_gif_javascript_polyglot_is_just_a_wide_gif() -> None:
    """GIF89a/*...*/ JavaScript is read as the GIF its bytes describe: width 0x2A2F, blank rows, no script."""
    image = open_image(GIF_JS)
    assert image.size == (0x2A2F, 8) and image.mode == "RGB" and image.info == {}


@pytest.mark.parametrize(
    "data",
    [
        encode(Image.new("RGB", (8, 8), OPAQUE), "JPEG", quality=95, comment=PHP),
        with_png_chunk(flat("PNG"), b"iCCP", b"icc\x00\x00" + zlib.compress(b"NOT A PROFILE " + PHP)),
        with_jpeg_segment(flat("JPEG"), 0xE2, b"ICC_PROFILE\x00\x01\x01NOT A PROFILE " + PHP),
        png_with_text(PHP.decode()),
        encode(Image.new("RGB", (8, 8), OPAQUE), "WEBP", exif=b"Exif\x00\x00" + PHP, lossless=True),
    ],
    ids=["jpeg-comment", "png-icc", "jpeg-icc", "png-text", "webp-exif"],
)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_files_saved_from_the_normalised_image_carry_nothing_of_the_upload(data: bytes, fmt: str) -> None:
    """Thumbnails and stored sources are saved from the normalised image; none may re-emit the payload.

    Pillow's writers copy `info` (an ICC profile, a JPEG comment) into what they save, so a normalised
    image that kept the upload's info would publish its payload again in the bot's own files.
    """
    saved = encode(open_image(data), fmt)
    assert b"<?php" not in saved and b"NOT A PROFILE" not in saved
    assert Image.open(io.BytesIO(saved)).info.get("icc_profile") in (None, b"")


@pytest.mark.parametrize(
    ("data", "content_type"),
    [
        (
            b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"><rect width="9" height="9"/></svg>',
            "image/png",
        ),
        (b"<!DOCTYPE html><html><script>alert(1)</script></html>", "image/png"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n", "image/png"),
        (b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", "image/png"),
        (b"%PDF-1.4\n" + encode(gradient(), "JPEG"), "image/png"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>" + encode(gradient(), "PNG"), "image/png"),
    ],
    ids=["svg", "html", "eps", "pdf", "pdf-with-jpeg", "svg-then-png"],
)
def test_non_images_named_png_pass_the_metadata_check_and_fail_on_their_bytes(
    data: bytes, content_type: str
) -> None:
    """Discord derives the content type from the name, so the lie passes check_declared; the bytes do not."""
    check_declared(len(data), None, None, content_type)
    with pytest.raises(ImageError) as caught:
        open_image(data)
    assert str(caught.value) == NOT_AN_IMAGE


EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\n"
    b"newpath 0 0 moveto 10 10 lineto stroke\nshowpage\n%%EOF\n"
)
PS = b"%!PS-Adobe-2.0\n%%BoundingBox: 0 0 5 5\n%%EndComments\nshowpage\n"
DOS_EPS = b"\xc5\xd0\xd3\xc6" + struct.pack("<IIIIII", 30, len(EPS), 0, 0, 0, 0) + b"\xff\xff" + EPS


@pytest.mark.parametrize("data", [EPS, PS, DOS_EPS], ids=["eps", "ps", "dos-eps"])
def test_postscript_is_rejected_without_touching_ghostscript(
    data: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EPS/PS bytes, which Pillow would hand to Ghostscript, are rejected before the EPS parser runs."""
    assert Image.open(io.BytesIO(data)).format == "EPS"  # Pillow itself would take it

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("EPS handling reached")

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", forbidden)
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", forbidden)
    monkeypatch.setattr(EpsImagePlugin, "has_ghostscript", forbidden)
    monkeypatch.setattr(subprocess, "check_call", forbidden)
    monkeypatch.setattr(subprocess, "Popen", forbidden)
    with pytest.raises(ImageError, match="not an image I can read"):
        open_image(data)


def test_pdf_is_rejected() -> None:
    """A PDF, even one Pillow wrote from an image, is not an image intake accepts."""
    data = encode(Image.new("RGB", (10, 10), "red"), "PDF")
    assert data.startswith(b"%PDF")
    with pytest.raises(ImageError, match="not an image I can read"):
        open_image(data)


# --- size limits and bombs ----------------------------------------------------------------------------------


def test_png_bomb_is_rejected_before_decoding(forbid_load: None) -> None:
    """A 1 KB PNG declaring 30000×30000 is refused from its header; its pixels are never decoded."""
    data = png_declaring(30000, 30000)
    assert len(data) < 2048
    with pytest.raises(ImageError) as caught:
        open_image(data)
    assert str(caught.value) == "That image is 30000×30000 pixels; the limit is 40 megapixels."


def test_check_image_refuses_what_open_image_refuses_from_the_headers_alone(
    request: pytest.FixtureRequest,
) -> None:
    """check_image, which the command line runs on every input before loading a model, gives open_image's
    sentence for a file that is not an image, an empty one and a bomb, and passes a photograph, all without
    decoding a pixel."""
    photograph = encode(Image.fromarray(skdata.chelsea()), "JPEG")
    request.getfixturevalue("forbid_load")
    usual, small = images.DEFAULT_LIMITS, IntakeSettings(max_bytes=1000)
    bomb = "That image is 30000×30000 pixels; the limit is 40 megapixels."
    cases = [
        (b"this is not an image", usual, NOT_AN_IMAGE),
        (b"", usual, EMPTY_FILE),
        (png_declaring(30000, 30000), usual, bomb),
        (b"x" * 2000, small, "That file is 2 KB; the limit is 1000 bytes."),
    ]
    for data, limits, sentence in cases:
        with pytest.raises(ImageError) as caught:
            check_image(data, limits)
        assert str(caught.value) == sentence
    check_image(photograph)


def test_bmp_bomb_is_described_by_pillows_pixel_count() -> None:
    """A BMP declaring 30000×30000 trips Pillow's own guard first; the sentence gives its megapixels."""
    with pytest.raises(ImageError) as caught:
        open_image(bmp_declaring(30000, 30000))
    assert str(caught.value) == "That image is about 900 megapixels; the limit is 40 megapixels."


@pytest.mark.parametrize("declaring", [png_declaring, bmp_declaring], ids=["png", "bmp"])
def test_bomb_is_rejected_without_pillows_global_guard(
    declaring: Callable[[int, int], bytes], no_pillow_bomb_guard: None, forbid_load: None
) -> None:
    """With Image.MAX_IMAGE_PIXELS disabled, intake's own limit still refuses 30000×30000 before decoding."""
    with pytest.raises(ImageError) as caught:
        open_image(declaring(30000, 30000))
    assert str(caught.value) == "That image is 30000×30000 pixels; the limit is 40 megapixels."


@pytest.mark.parametrize("declaring", [png_declaring, bmp_declaring], ids=["png", "bmp"])
def test_pixel_limit_below_pillows_threshold(
    declaring: Callable[[int, int], bytes], forbid_load: None
) -> None:
    """An 8000×8000 image (64 MP, under Pillow's own bomb threshold) is refused by intake's 40 MP limit."""
    with pytest.raises(ImageError, match=r"^That image is 8000×8000 pixels; the limit is 40 megapixels\.$"):
        open_image(declaring(8000, 8000))


@pytest.mark.filterwarnings("error::PIL.Image.DecompressionBombWarning")
def test_pillow_bomb_warning_raised_as_error_becomes_image_error() -> None:
    """Under an error filter Pillow raises its bomb warning at 100 MP; intake turns it into ImageError."""
    with pytest.raises(ImageError, match="about 100 megapixels; the limit is 40 megapixels"):
        open_image(bmp_declaring(10000, 10000))


def test_custom_pixel_limit_is_used() -> None:
    """The limits argument replaces the defaults, and small limits are described in plain pixels."""
    limits = IntakeSettings(max_pixels=64 * 64, max_side=64)
    with pytest.raises(ImageError, match=r"65×65 pixels; the limit is 4,096 pixels\."):
        open_image(encode(Image.new("RGB", (65, 65)), "PNG"), limits)
    assert open_image(encode(Image.new("RGB", (64, 64)), "PNG"), limits).size == (64, 64)


@pytest.mark.parametrize("screen", [(60000, 60000), (9000, 9000)])
def test_gif_declaring_a_huge_screen_is_rejected(screen: tuple[int, int]) -> None:
    """A tiny GIF whose logical screen is enormous is refused, whichever guard sees it first."""
    with pytest.raises(ImageError, match="megapixels"):
        open_image(gif_bytes(screen, [(0, 0, 1, 1, 0)]))


def test_gif_huge_first_frame_is_refused_before_pillow_opens_it(
    no_pillow_bomb_guard: None, forbid_open: None
) -> None:
    """A 1×1-screen GIF whose first frame spans 30000×30000 is refused before Pillow allocates its buffer."""
    data = gif_bytes((1, 1), [(0, 0, 30000, 30000, 0)], disposal=2)
    with pytest.raises(ImageError, match="30000×30000 pixels; the limit is 40 megapixels"):
        open_image(data)


DECOY = b"\x0a\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\x00" + b"\x00"


@pytest.mark.parametrize(
    "extension",
    [b"\x21\xf9\x00", b"\x21\xff\x0bNETSCAPE2.0\x00"],
    ids=["empty-control-block", "netscape-then-empty"],
)
def test_gif_decoy_descriptor_does_not_hide_the_real_first_frame(
    extension: bytes, no_pillow_bomb_guard: None, forbid_open: None
) -> None:
    """A 1×1 decoy descriptor inside data Pillow skips as extension blocks cannot hide a huge first frame."""
    small = gif_bytes((1, 1), [(0, 0, 30000, 30000, 0)])
    header, frame = small[:19], small[19 + 8 :]  # screen + palette; the frame without its control block
    data = header + extension + DECOY + frame
    assert GifImagePlugin.GifImageFile(io.BytesIO(data)).size == (30000, 30000)  # what Pillow would see
    with pytest.raises(ImageError, match="30000×30000 pixels"):
        open_image(data)


@pytest.mark.parametrize(
    "extension",
    [
        b"",
        b"\x21\xf9\x04\x00\x00\x00\x00\x00",
        b"\x21\xf9\x00",
        b"\x21\xff\x0bNETSCAPE2.0\x00",
        b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00",
        b"\x21\xfe\x00",
        b"\x21\xfe\x02hi\x00",
        b"\x00\x07junk",
    ],
    ids=[
        "none",
        "control",
        "empty-control",
        "netscape-empty",
        "netscape",
        "empty-comment",
        "comment",
        "junk",
    ],
)
def test_gif_size_walk_agrees_with_pillow(extension: bytes, no_pillow_bomb_guard: None) -> None:
    """Intake's pre-open GIF walk finds the same first frame, hence the same canvas, as Pillow's reader."""
    small = gif_bytes((2, 2), [(0, 0, 300, 200, 0)])
    data = small[:19] + extension + DECOY + small[19 + 8 :]
    assert images._declared_canvas(data) == GifImagePlugin.GifImageFile(io.BytesIO(data)).size


@pytest.mark.parametrize("data", [png_declaring(0, 10), png_declaring(10, 0), gif_bytes((0, 0), [])])
def test_zero_sized_images_are_rejected(data: bytes) -> None:
    """A header declaring no pixels at all is an ImageError."""
    with pytest.raises(ImageError):
        open_image(data)


@pytest.mark.parametrize("kind", ["VP8X", "VP8 ", "VP8L"])
def test_webp_huge_canvas_is_refused_before_pillow_opens_it(
    kind: str, no_pillow_bomb_guard: None, forbid_open: None
) -> None:
    """A WebP header (extended, lossy or lossless) declaring 16000×16000 is refused before libwebp sees it."""
    with pytest.raises(ImageError, match="16000×16000 pixels; the limit is 40 megapixels"):
        open_image(webp_declaring(16000, 16000, kind))


def test_bomb_refusal_is_quick() -> None:
    """Refusing a 30000×30000 PNG bomb does no decoding work (only a very loose bound is asserted)."""
    data = png_declaring(30000, 30000)
    started = time.perf_counter()
    with pytest.raises(ImageError):
        open_image(data)
    assert time.perf_counter() - started < 5.0


def test_too_many_bytes_are_rejected_before_decoding(forbid_open: None) -> None:
    """Bytes over max_bytes are refused by length alone, with sizes in MB, before anything is parsed."""
    with pytest.raises(ImageError) as caught:
        open_image(b"\x89PNG" + bytes(int(31.2 * 1024 * 1024) - 4))
    assert str(caught.value) == "That file is 31.2 MB; the limit is 25 MB."
    with pytest.raises(ImageError, match=r"^That file is 25\.1 MB; the limit is 25 MB\.$"):
        open_image(bytes(25 * 1024 * 1024 + 1))
    with pytest.raises(ImageError, match=r"^That file is 2 KB; the limit is 1 KB\.$"):
        open_image(bytes(2048), IntakeSettings(max_bytes=1024))


def test_empty_bytes_are_rejected(forbid_open: None) -> None:
    """Zero bytes get their own sentence."""
    with pytest.raises(ImageError, match=r"^That file is empty\.$"):
        open_image(b"")


@pytest.mark.parametrize(
    ("size", "accepted"),
    [((1, 1), True), ((1, 16000), True), ((16000, 1), True), ((1, 16384), True), ((1, 65000), False)],
)
def test_long_thin_images_respect_max_side(size: tuple[int, int], accepted: bool) -> None:
    """1×16000 is fine, but 1×65000 breaks the 16384-pixel side limit even though it has few pixels."""
    data = encode(Image.new("L", size, 9), "PNG")
    if accepted:
        image = open_image(data)
        assert image.size == size and image.getpixel((0, size[1] - 1)) == (9, 9, 9)
    else:
        with pytest.raises(ImageError) as caught:
            open_image(data)
        assert str(caught.value) == (
            "That image is 1×65000 pixels; the longest side allowed is 16384 pixels."
        )


def test_global_pillow_settings_are_left_alone() -> None:
    """Intake neither lowers Pillow's bomb limit nor enables truncated loading for the whole process."""
    before = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    for data in (SEED_FILES["PNG"], png_declaring(30000, 30000), SEED_FILES["JPEG"][:100]):
        rgb_or_image_error(data)
    after = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    assert after == before


@pytest.mark.parametrize(
    "declaring",
    [jpeg_declaring, lambda width, height: tiff_bytes(width, height, bytes(16))],
    ids=["jpeg", "tiff"],
)
@pytest.mark.parametrize("size", [(65535, 65535), (20000, 20000), (8000, 8000), (65000, 1)])
@pytest.mark.parametrize("pillow_guard", [True, False], ids=["pillow-guard", "no-pillow-guard"])
def test_jpeg_and_tiff_declaring_huge_sizes_are_refused_from_the_header(
    declaring: Callable[[int, int], bytes],
    size: tuple[int, int],
    pillow_guard: bool,
    forbid_load: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A small JPEG or TIFF whose header claims a huge size is refused before any pixel is decoded."""
    if not pillow_guard:
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    data = declaring(*size)
    assert len(data) < 2048
    with pytest.raises(ImageError) as caught:
        open_image(data)
    width, height = size
    message = str(caught.value)
    if width * height > 2 * 89_478_485 and pillow_guard:  # Pillow's own guard answers first
        assert message.startswith("That image is about ") and message.endswith("the limit is 40 megapixels.")
    elif width * height > 40_000_000:
        assert message == f"That image is {width}×{height} pixels; the limit is 40 megapixels."
    else:
        assert message == f"That image is {width}×{height} pixels; the longest side allowed is 16384 pixels."


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"])
def test_one_pixel_image_in_every_format(fmt: str) -> None:
    """A 1×1 image in every allowed format decodes to that one pixel."""
    options = {"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}
    image = open_image(encode(Image.new("RGB", (1, 1), (200, 40, 90)), fmt, **options))
    assert image.size == (1, 1)
    assert np.abs(pixels(image)[0, 0] - (200, 40, 90)).max() <= (4 if fmt == "JPEG" else 0)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"])
@pytest.mark.parametrize("tall", [True, False], ids=["1xN", "Nx1"])
def test_longest_allowed_line_decodes_in_every_format(fmt: str, tall: bool) -> None:
    """A one-pixel line as long as allowed (WebP: its own 16383 maximum) decodes whole, end pixel included."""
    length = 16383 if fmt == "WEBP" else 16384
    size = (1, length) if tall else (length, 1)
    line = Image.new("RGB", size, (0, 0, 0))
    line.putpixel((size[0] - 1, size[1] - 1), (255, 255, 255))
    options = {"lossless": True} if fmt == "WEBP" else {"quality": 100} if fmt == "JPEG" else {}
    image = open_image(encode(line, fmt, **options))
    assert image.size == size
    end, start = image.getpixel((size[0] - 1, size[1] - 1)), image.getpixel((0, 0))
    assert isinstance(end, tuple) and isinstance(start, tuple)
    assert min(end) >= 200 and max(start) <= 60


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "BMP", "TIFF"])
@pytest.mark.parametrize("size", [(1, 65000), (65000, 1)], ids=["1x65000", "65000x1"])
def test_lines_longer_than_the_side_limit_are_refused_from_the_header(
    fmt: str, size: tuple[int, int], forbid_load: None
) -> None:
    """1×65000 and 65000×1 have few pixels but break the side limit; no format decodes them first."""
    data = encode(Image.new("L", size, 9), fmt)
    with pytest.raises(ImageError) as caught:
        open_image(data)
    width, height = size
    assert str(caught.value) == (
        f"That image is {width}×{height} pixels; the longest side allowed is 16384 pixels."
    )


def apng_bytes(frames: int) -> bytes:
    """A 1×1 greyscale APNG: frame 0 at level 200, every later frame at level 16."""

    def control(seq: int) -> bytes:
        return struct.pack(">IIIIIHHBB", seq, 1, 1, 0, 0, 1, 100, 0, 0)

    chunks = [
        (b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)),
        (b"acTL", struct.pack(">II", frames, 0)),
        (b"fcTL", control(0)),
        (b"IDAT", zlib.compress(b"\x00\xc8")),
    ]
    later = zlib.compress(b"\x00\x10")
    for seq in range(1, 2 * frames - 1, 2):
        chunks += [(b"fcTL", control(seq)), (b"fdAT", struct.pack(">I", seq + 1) + later)]
    return png_assemble([*chunks, (b"IEND", b"")])


@pytest.mark.timeout(60)
def test_apng_with_thousands_of_frames_reads_only_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 5000-frame APNG is answered from frame 0 alone; Pillow is never asked to seek further."""
    data = apng_bytes(5000)
    opened = Image.open(io.BytesIO(data))
    assert isinstance(opened, PngImagePlugin.PngImageFile) and opened.n_frames == 5000
    seen: list[int] = []
    original = PngImagePlugin.PngImageFile._seek

    def record(self: PngImagePlugin.PngImageFile, frame: int, *args: Any) -> None:
        seen.append(frame)
        original(self, frame, *args)

    monkeypatch.setattr(PngImagePlugin.PngImageFile, "_seek", record)
    assert open_image(data).getpixel((0, 0)) == (200, 200, 200)
    assert set(seen) <= {0}


def animated_webp(frames: int) -> bytes:
    """A 1×1 lossless animated WebP alternating red (frame 0) and blue."""
    pictures = [Image.new("RGB", (1, 1), (255, 0, 0) if i % 2 == 0 else (0, 0, 255)) for i in range(frames)]
    return encode(pictures[0], "WEBP", save_all=True, append_images=pictures[1:], lossless=True, duration=10)


@pytest.mark.timeout(60)
def test_webp_with_thousands_of_frames_reads_only_the_first() -> None:
    """A 2000-frame animated WebP yields frame 0, found without decoding the rest."""
    data = animated_webp(2000)
    opened = Image.open(io.BytesIO(data))
    assert isinstance(opened, WebPImagePlugin.WebPImageFile) and opened.n_frames == 2000
    assert open_image(data).getpixel((0, 0)) == (255, 0, 0)


# Decoding runs in a fresh interpreter so that its peak resident memory is the decode's alone.
MEASURE_DECODE = """
import json, sys, tracemalloc
from pathlib import Path
from i2p2i_bot.images import ImageError, open_image

def status_kib(field):
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))

data = Path(sys.argv[1]).read_bytes()
with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # restart the peak (VmHWM) from the current resident size
before_kib = status_kib("VmRSS")
tracemalloc.start()
try:
    image = open_image(data)
    outcome = [image.mode, image.width, image.height, list(image.getpixel((0, 0)))]
except ImageError as exc:
    outcome = str(exc)
traced_peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
growth = (status_kib("VmHWM") - before_kib) * 1024
print(json.dumps({"outcome": outcome, "traced_peak": traced_peak, "rss_growth": growth}))
"""
BOMB_SIDE = 6000  # 36 megapixels: just under the 40-megapixel limit, so these are decoded, not refused
# The most an accepted picture may cost: its decoded pixels in the widest mode Pillow gives it (4 bytes a
# pixel for RGBA, I and F), the 3-byte RGB result, and a little more. Measured here: 5 to 9.4. Converting
# whole images at once (float64 copies of 16-bit and float pictures, a spare RGBA copy) cost 16 to 44.
RSS_BYTES_PER_PIXEL = 11
TRACED_PEAK_BYTES = 32 * 2**20  # Python and numpy allocations never hold a whole-image copy


def keyed_sixteen_bit_png() -> bytes:
    values = np.zeros((BOMB_SIDE, BOMB_SIDE), dtype=np.uint16)
    values[0, :] = 1000
    return encode(Image.fromarray(values), "PNG", transparency=1000)


BOMBS: dict[str, Callable[[], bytes]] = {
    "png-grey": lambda: encode(Image.new("L", (BOMB_SIDE, BOMB_SIDE)), "PNG"),
    "png-rgba": lambda: encode(Image.new("RGBA", (BOMB_SIDE, BOMB_SIDE)), "PNG"),
    "png-16bit": lambda: encode(Image.fromarray(np.zeros((BOMB_SIDE, BOMB_SIDE), np.uint16)), "PNG"),
    "png-16bit-keyed": keyed_sixteen_bit_png,
    "gif": lambda: encode(Image.new("P", (BOMB_SIDE, BOMB_SIDE)), "GIF"),
    "tiff-float": lambda: encode(
        Image.fromarray(np.zeros((BOMB_SIDE, BOMB_SIDE), np.float32)),
        "TIFF",
        compression="tiff_adobe_deflate",
    ),
}


@functools.cache
def bomb_bytes(name: str) -> bytes:
    """BOMBS[name], encoded once: the memory test and the bounded corpus both use them."""
    return BOMBS[name]()


@pytest.mark.skipif(sys.platform != "linux", reason="reads resident memory from /proc")
@pytest.mark.parametrize("name", sorted(BOMBS))
@pytest.mark.timeout(180)
def test_decompression_bombs_under_the_limit_decode_within_a_memory_bound(name: str, tmp_path: Path) -> None:
    """A few-hundred-KB file that inflates to 36 megapixels decodes within 11 bytes a pixel of memory.

    These files are allowed (under 40 MP), so the bound is on what decoding them may cost: peak resident
    memory of a fresh process, and peak Python/numpy allocations traced by tracemalloc.
    """
    data = bomb_bytes(name)
    assert len(data) < 300_000  # a real bomb: over 100× smaller than what it decodes to
    path = tmp_path / "bomb"
    path.write_bytes(data)
    done = subprocess.run(
        [sys.executable, "-c", MEASURE_DECODE, str(path)],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    expected_corner = list(GREY) if name in ("png-rgba", "png-16bit-keyed") else [0, 0, 0]  # transparent
    assert report["outcome"] == ["RGB", BOMB_SIDE, BOMB_SIDE, expected_corner]
    assert report["traced_peak"] < TRACED_PEAK_BYTES, report
    assert report["rss_growth"] < RSS_BYTES_PER_PIXEL * BOMB_SIDE * BOMB_SIDE, report


def png_text_bomb(kind: bytes, after_pixels: bool) -> bytes:
    """A small PNG carrying 100 zTXt or iTXt chunks that each inflate to 1 MB, before or after its pixels."""
    body = b"k\x00\x00" if kind == b"zTXt" else b"k\x00\x01\x00\x00\x00"
    bomb = [(kind, body + zlib.compress(bytes(1_000_000), 9))] * 100
    chunks, tail = png_chunks(flat("PNG"))
    where = len(chunks) - 1 if after_pixels else 1
    return png_assemble(chunks[:where] + bomb + chunks[where:], tail)


@pytest.mark.parametrize("kind", [b"zTXt", b"iTXt"])
@pytest.mark.parametrize("after_pixels", [False, True], ids=["before-idat", "after-idat"])
@pytest.mark.timeout(60)
def test_png_text_chunk_bomb_is_bounded(kind: bytes, after_pixels: bool) -> None:
    """100 compressed text chunks of 1 MB each (a 100 KB file) end as an ImageError with little memory."""
    data = png_text_bomb(kind, after_pixels)
    assert len(data) < 200_000
    tracemalloc.start()
    try:
        outcome = rgb_or_image_error(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outcome == "error"
    assert peak < TRACED_PEAK_BYTES


# --- check_declared -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size_bytes", "width", "height", "content_type"),
    [
        (1_000, 800, 600, "image/png"),
        (1_000, 800, 600, "IMAGE/JPEG; charset=binary"),
        (1_000, None, None, None),
        (1_000, None, None, ""),
        (1_000, 10, 10, "image/heic"),
        (25 * 1024 * 1024, 6000, 6000, "image/webp"),
        (1_000, 1, 16384, "image/gif"),
        (1_000, 16384, None, "image/tiff"),
    ],
)
def test_check_declared_accepts(
    size_bytes: int, width: int | None, height: int | None, content_type: str | None
) -> None:
    """Plausible attachments pass: allowed or unknown image types, unknown dimensions, sizes at the limits."""
    check_declared(size_bytes, width, height, content_type)


@pytest.mark.parametrize(
    ("size_bytes", "width", "height", "content_type", "message"),
    [
        (1_000, None, None, "application/pdf", NOT_AN_IMAGE),
        (1_000, None, None, "text/html", NOT_AN_IMAGE),
        (1_000, None, None, "application/postscript", NOT_AN_IMAGE),
        (1_000, None, None, "application/octet-stream", NOT_AN_IMAGE),
        (1_000, 64, 64, "image/svg+xml", NOT_AN_IMAGE),
        (1_000, None, None, "image/x-eps", NOT_AN_IMAGE),
        (0, None, None, "image/png", "That file is empty."),
        (int(31.2 * 1024 * 1024), None, None, "image/png", "That file is 31.2 MB; the limit is 25 MB."),
        (1_000, 20000, 20000, "image/png", "That image is 20000×20000 pixels; the limit is 40 megapixels."),
        (
            1_000,
            1,
            65000,
            "image/png",
            "That image is 1×65000 pixels; the longest side allowed is 16384 pixels.",
        ),
        (
            1_000,
            None,
            65000,
            None,
            "That image has a side of 65000 pixels; the longest side allowed is 16384 pixels.",
        ),
    ],
)
def test_check_declared_rejects(
    size_bytes: int, width: int | None, height: int | None, content_type: str | None, message: str
) -> None:
    """Metadata that already rules the attachment out gets the one-sentence ImageError the bytes would."""
    with pytest.raises(ImageError) as caught:
        check_declared(size_bytes, width, height, content_type)
    assert str(caught.value) == message


def test_check_declared_uses_given_limits() -> None:
    """check_declared applies the limits it is given rather than the defaults."""
    limits = IntakeSettings(max_bytes=2048, max_pixels=100 * 100, max_side=100)
    check_declared(2048, 100, 100, "image/png", limits)
    with pytest.raises(ImageError, match="the limit is 2 KB"):
        check_declared(2049, 100, 100, "image/png", limits)
    with pytest.raises(ImageError, match="the longest side allowed is 100 pixels"):
        check_declared(10, 101, 1, "image/png", limits)


# --- properties ---------------------------------------------------------------------------------------------

MAGIC_PREFIXES = [
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF89a",
    b"GIF87a",
    b"BM",
    b"II*\x00",
    b"MM\x00*",
    b"RIFF\x00\x00\x00\x00WEBPVP8X",
    b"%!PS-Adobe-3.0",
    b"%PDF-1.4",
]


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(sorted(SEED_FILES.values()))))
    for _ in range(draw(st.integers(1, 8))):
        position = draw(st.integers(0, len(data) - 1))
        if draw(st.booleans()):
            data[position] = draw(st.integers(0, 255))
        else:
            data[position] ^= 1 << draw(st.integers(0, 7))
    if draw(st.booleans()):
        data = data[: draw(st.integers(1, len(data)))]
    return bytes(data)


# Each example takes milliseconds. The deadline is wall-clock time (hypothesis measures no other kind), so it
# is set far above that: a shared machine may stall any one example for a while, but not for seconds.
FUZZ_DEADLINE = timedelta(seconds=5)
FUZZ_SETTINGS = settings(
    max_examples=200, deadline=FUZZ_DEADLINE, database=None, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.mark.filterwarnings("ignore::UserWarning")
@FUZZ_SETTINGS
@given(
    st.one_of(st.binary(max_size=512), st.tuples(st.sampled_from(MAGIC_PREFIXES), st.binary(max_size=512)))
)
def test_arbitrary_bytes_give_an_image_or_image_error(data: bytes | tuple[bytes, bytes]) -> None:
    """Any bytes, including ones that start like an image, decode to RGB or raise ImageError."""
    if isinstance(data, tuple):
        data = data[0] + data[1]
    rgb_or_image_error(data, FUZZ_LIMITS)


@pytest.mark.filterwarnings("ignore::UserWarning")
@FUZZ_SETTINGS
@given(mutated_images())
def test_mutated_images_give_an_image_or_image_error(data: bytes) -> None:
    """Random byte changes and truncations of valid PNG/JPEG/GIF/BMP/WebP/TIFF/APNG files never escape."""
    rgb_or_image_error(data, FUZZ_LIMITS)


# Seed names by container, for the structure-aware mutations (tests/fuzz_intake.py holds the mutators).
CONTAINERS = {
    "png": ("png", "apng"),
    "jpeg": ("jpeg", "mpo"),
    "gif": ("gif",),
    "bmp": ("bmp",),
    "webp": ("webp",),
    "tiff": ("tiff",),
}


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("container", sorted(CONTAINERS))
@settings(
    max_examples=150, deadline=FUZZ_DEADLINE, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(data=st.data())
def test_structure_aware_mutations_give_an_image_or_image_error(container: str, data: st.DataObject) -> None:
    """Chunk, block, segment and header-field mutations that keep the framing valid never escape intake.

    PNG chunks keep valid CRCs, GIF blocks their sub-block framing, JPEG segments their lengths, TIFF
    directories their layout: byte noise rarely gets past those checks, these reach the decoders behind.
    """
    names = [name for name in sorted(HOSTILE_SEEDS) if name.split("-")[0] in CONTAINERS[container]]
    mutated = HOSTILE_SEEDS[data.draw(st.sampled_from(names), label="seed")]
    rng = data.draw(st.randoms(use_true_random=False), label="rng")
    for _ in range(data.draw(st.integers(1, 3), label="rounds")):
        mutated = structured_mutation(mutated, rng)
    rgb_or_image_error(mutated, FUZZ_LIMITS)


def test_png_mutations_keep_every_chunk_checksum_valid() -> None:
    """The PNG mutator's output always has correct chunk lengths and CRCs, so it is not refused for those."""
    rng = random.Random(1234)
    for round_ in range(300):
        mutated = structured_mutation(HOSTILE_SEEDS[["png", "apng", "png-palette-trns"][round_ % 3]], rng)
        pos = 8
        while pos + 12 <= len(mutated):
            (length,) = struct.unpack_from(">I", mutated, pos)
            if pos + 12 + length > len(mutated):
                break  # the unparsed tail a mutation may append (a ZIP, HTML)
            kind_and_body = mutated[pos + 4 : pos + 8 + length]
            assert struct.unpack_from(">I", mutated, pos + 8 + length)[0] == zlib.crc32(kind_and_body)
            pos += 12 + length


# --- time and memory bound over the whole hostile corpus ----------------------------------------------------

# What each input of the corpus may cost the decoding process, which runs alone under these caps (see
# tests/fuzz_intake.replay_bounded). CPU time rather than wall time, as other work on a shared machine slows
# the wall clock, not the CPU time. The slowest inputs, the 36-megapixel bombs, take up to 0.7 s.
BOUND_CPU_S = 2.0
# An input still running after this much CPU time is killed, and the test names it instead of hanging.
BOUND_KILL_CPU_S = 10.0
# Address space allowed above the decoding process's own after its imports (about 170 MB: Pillow and numpy,
# no torch). The 36-megapixel bombs grow resident memory by up to 280 MiB, so the cap is never what refuses
# a file within the limits, yet it stops any input from taking the machine's memory.
BOUND_HEADROOM_BYTES = 1 << 30
# Peak resident growth allowed for any one input: what the largest picture within the limits may cost.
BOUND_RSS_BYTES = RSS_BYTES_PER_PIXEL * images.DEFAULT_LIMITS.max_pixels
STRUCTURED_MUTATIONS_PER_SEED = 40
BYTE_MUTATIONS_PER_SEED = 20

CorpusEntry = tuple[str, bytes, IntakeSettings]


def hostile_corpus() -> list[CorpusEntry]:
    """The inputs the generators in this file make, named, each with the limits it is decoded under.

    Truncations and header bit flips of every seed, fixed-seed structure-aware and byte mutations (as the
    hypothesis tests draw, at their small limits), thousands of frames, bombs under and over the limits,
    text-chunk, colour-profile and EXIF bombs.
    """
    default = images.DEFAULT_LIMITS
    corpus: list[CorpusEntry] = []
    for name, data in sorted(HOSTILE_SEEDS.items()):
        corpus.append((name, data, default))
        corpus += [(f"{name} cut at {cut}", data[:cut], default) for cut in cut_offsets(len(data))]
        corpus += [
            (f"{name} bit flip {i // 8}.{i % 8}", flipped, default)
            for i, (_, flipped) in enumerate(header_bit_flips(data))
        ]
        rng = random.Random(name)  # a string seed: the same corpus on every run and machine
        for i in range(STRUCTURED_MUTATIONS_PER_SEED):
            mutated = data
            for _ in range(rng.randint(1, 3)):
                mutated = structured_mutation(mutated, rng)
            corpus.append((f"{name} structured mutation {i}", mutated, FUZZ_LIMITS))
        corpus += [
            (f"{name} byte mutation {i}", byte_mutation(data, rng), FUZZ_LIMITS)
            for i in range(BYTE_MUTATIONS_PER_SEED)
        ]
    corpus += [
        ("gif with 5000 frames", many_frame_gif(5000), default),
        ("apng with 5000 frames", apng_bytes(5000), default),
        ("webp with 2000 frames", animated_webp(2000), default),
        ("png declaring 30000x30000", png_declaring(30000, 30000), default),
        ("bmp declaring 30000x30000", bmp_declaring(30000, 30000), default),
        ("jpeg declaring 65535x65535", jpeg_declaring(65535, 65535), default),
        ("tiff declaring 65535x65535", tiff_bytes(65535, 65535, bytes(16)), default),
        ("gif with a 60000x60000 screen", gif_bytes((60000, 60000), [(0, 0, 1, 1, 0)]), default),
        ("gif with a 30000x30000 frame", gif_bytes((1, 1), [(0, 0, 30000, 30000, 0)], disposal=2), default),
        ("gif javascript polyglot", GIF_JS, default),
        ("png with an iccp zlib bomb", with_png_chunk(flat("PNG"), b"iCCP", ICC_ZLIB_BOMB), default),
    ]
    corpus += [
        (f"{kind!r} webp declaring 16000x16000", webp_declaring(16000, 16000, kind), default)
        for kind in ("VP8X", "VP8 ", "VP8L")
    ]
    corpus += [
        (
            f"png {kind.decode()} bomb {'after' if after else 'before'} its pixels",
            png_text_bomb(kind, after),
            default,
        )
        for kind in (b"zTXt", b"iTXt")
        for after in (False, True)
    ]
    corpus += [
        (f"jpeg with exif {i}", encode(marked(), "JPEG", exif=b"Exif\x00\x00" + exif), default)
        for i, exif in enumerate([EXIF_LOOP, EXIF_HUGE_COUNT, EXIF_GIANT_VALUE])
    ]
    corpus += [(f"bomb {name}", bomb_bytes(name), default) for name in sorted(BOMBS)]
    return corpus


def replay_bounded(
    corpus: list[CorpusEntry], tmp_path: Path, headroom_bytes: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Decode the corpus in a fresh process under the memory and CPU caps: its cap line and one per input.

    A process that dies (a decoder crashing, or killed for CPU time) fails the test with the input it was on.
    """
    corpus_path, report_path = tmp_path / "corpus", tmp_path / "report.jsonl"
    write_corpus(corpus_path, corpus)
    replay = (
        "import sys; from pathlib import Path; from tests.fuzz_intake import replay_bounded; "
        "replay_bounded(Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))"
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            replay,
            str(corpus_path),
            str(report_path),
            str(headroom_bytes),
            str(BOUND_KILL_CPU_S),
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=Path(__file__).resolve().parents[1],
        check=False,
    )
    lines = report_path.read_text().splitlines() if report_path.exists() else []
    records = [json.loads(line) for line in lines]
    if done.returncode != 0:
        # The first line describes the cap, so the input that was running is the one after the last line.
        stuck = repr(corpus[len(records) - 1][0]) if 0 < len(records) <= len(corpus) else "no input"
        pytest.fail(f"the decoding process ended with {done.returncode} on {stuck}: {done.stderr[-2000:]}")
    assert len(records) == len(corpus) + 1
    return records[0], records[1:]


@pytest.mark.skipif(sys.platform != "linux", reason="caps memory with RLIMIT_AS, reads /proc")
@pytest.mark.timeout(300)
def test_hostile_corpus_ends_within_a_cpu_and_memory_bound(tmp_path: Path) -> None:
    """Each of ~14,600 hostile inputs ends as an RGB image or a known sentence, within a CPU and memory bound.

    They are decoded one after another in a process whose address space is capped (RLIMIT_AS counts
    Pillow's and the codecs' own allocations, which tracemalloc does not see); each must take at most
    BOUND_CPU_S of CPU time and grow resident memory by at most BOUND_RSS_BYTES.
    """
    corpus = hostile_corpus()
    cap, records = replay_bounded(corpus, tmp_path, BOUND_HEADROOM_BYTES)
    assert cap["cap_holds"], cap  # the cap really refuses an allocation just over the headroom
    assert not cap["torch_loaded"]  # intake's baseline is Pillow and numpy alone
    failures = []
    for (name, _, limits), record in zip(corpus, records, strict=True):
        assert record["name"] == name
        if record["outcome"] == "image":
            width, height = record["size"]
            fits = width * height <= limits.max_pixels and max(width, height) <= limits.max_side
            if record["mode"] != "RGB" or not fits:
                failures.append(f"{name}: {record['mode']} image of {width}×{height}")
        elif record["outcome"] == "error":
            # The memory sentence is known, but here it would mean a file within the limits outgrew the cap.
            if record["message"] == TOO_MUCH_MEMORY or not (
                record["message"] in FIXED_SENTENCES or is_limit_sentence(record["message"])
            ):
                failures.append(f"{name}: {record['message']}")
        else:
            failures.append(f"{name}: {record['message']}")
        if record["cpu_s"] > BOUND_CPU_S:
            failures.append(f"{name}: {record['cpu_s']:.2f} s of CPU time")
        if record["rss_growth_bytes"] > BOUND_RSS_BYTES:
            failures.append(f"{name}: resident memory grew by {record['rss_growth_bytes'] / 2**20:.0f} MiB")
    assert not failures, f"{len(failures)} of {len(corpus)} inputs:\n" + "\n".join(failures[:30])
    outcomes = {record["outcome"] for record in records}
    assert outcomes == {"image", "error"}


@pytest.mark.skipif(sys.platform != "linux", reason="caps memory with RLIMIT_AS, reads /proc")
@pytest.mark.timeout(120)
def test_a_picture_larger_than_the_memory_cap_is_told_so_and_the_process_carries_on(tmp_path: Path) -> None:
    """Under a 64 MiB cap, a 36-megapixel RGBA PNG (144 MB decoded) gets the memory sentence, for real."""
    corpus: list[CorpusEntry] = [
        ("bomb png-rgba", bomb_bytes("png-rgba"), images.DEFAULT_LIMITS),
        ("png", HOSTILE_SEEDS["png"], images.DEFAULT_LIMITS),
    ]
    cap, (big, small) = replay_bounded(corpus, tmp_path, 64 * 2**20)
    assert cap["cap_holds"], cap
    assert (big["outcome"], big.get("message")) == ("error", TOO_MUCH_MEMORY)
    assert (small["outcome"], small["size"]) == ("image", [16, 12])
