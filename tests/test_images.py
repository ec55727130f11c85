"""Image intake: real photographs, odd modes, animations, orientation, and hostile or broken files."""

from __future__ import annotations

import hashlib
import io
import struct
import subprocess
import time
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import EpsImagePlugin, GifImagePlugin, Image, ImageFile, PngImagePlugin
from skimage import data as skdata

from i2p2i_bot import images
from i2p2i_bot.config import IntakeSettings
from i2p2i_bot.images import (
    BACKGROUND_RGB,
    DAMAGED_IMAGE,
    NOT_AN_IMAGE,
    ImageError,
    check_declared,
    image_sha256,
    load_intake,
    open_image,
)

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


def test_gif_with_thousands_of_frames_reads_only_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 5000-frame GIF is answered from frame 0 alone; no later frame is ever parsed."""
    data = gif_bytes((1, 1), [(0, 0, 1, 1, 0)] + [(0, 0, 1, 1, 1)] * 4999)
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


# --- broken and hostile files -------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("fraction", [0.0005, 0.01, 0.1, 0.5, 0.9, 0.99])
def test_truncated_files_are_rejected(fmt: str, fraction: float) -> None:
    """A photograph cut short anywhere from header to near the end is an ImageError, not a partial image."""
    data = encode(Image.fromarray(skdata.coffee()), fmt)
    cut = max(1, int(len(data) * fraction))
    with pytest.raises(ImageError) as caught:
        open_image(data[:cut])
    assert str(caught.value) in (DAMAGED_IMAGE, NOT_AN_IMAGE)


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


def rgb_or_image_error(data: bytes, limits: IntakeSettings = images.DEFAULT_LIMITS) -> str:
    """Decode and report which of the two allowed outcomes happened; any other exception propagates."""
    try:
        image = open_image(data, limits)
    except ImageError as exc:
        assert str(exc).endswith(".") and "\n" not in str(exc)
        return "error"
    assert image.mode == "RGB" and min(image.size) >= 1
    return "image"


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("fmt", sorted(SEED_FILES))
def test_header_bit_flips_give_an_image_or_image_error(fmt: str) -> None:
    """Flipping each bit of the first 48 bytes yields an RGB image or ImageError, never another exception."""
    data = SEED_FILES[fmt]
    outcomes = set()
    for position in range(min(48, len(data))):
        for bit in range(8):
            mutated = bytearray(data)
            mutated[position] ^= 1 << bit
            outcomes.add(rgb_or_image_error(bytes(mutated)))
    assert "error" in outcomes


@pytest.mark.parametrize(
    "data",
    [
        b"hello, this is a text file\n" * 10,
        b"<!DOCTYPE html><html><body><img src=x></body></html>",
        b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>',
        b'<svg xmlns="http://www.w3.org/2000/svg"><rect width="10" height="10"/></svg>',
        b"\x00" * 64,
        b"PK\x03\x04" + bytes(60),
        b"\x89PNG\r\n\x1a\n",
    ],
    ids=["text", "html", "svg-xml", "svg", "zeros", "zip", "png-signature-only"],
)
def test_files_that_are_not_images_are_rejected(data: bytes) -> None:
    """Text, HTML, SVG and other non-images get the "not an image" sentence whatever the file was called."""
    with pytest.raises(ImageError) as caught:
        open_image(data)
    assert str(caught.value) in (NOT_AN_IMAGE, DAMAGED_IMAGE)
    assert "PNG, JPEG, WebP, GIF, BMP or TIFF" in NOT_AN_IMAGE


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

# Tight limits keep each example fast: a mutated header can legally declare a large canvas. The property
# (an RGB image or ImageError, nothing else) does not depend on where the limits sit.
FUZZ_LIMITS = IntakeSettings(max_pixels=250_000, max_side=4096)
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


FUZZ_SETTINGS = settings(
    max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
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
