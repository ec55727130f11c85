"""Image intake: untrusted upload bytes in, one decoded RGB picture out, or a sentence saying why not."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from .config import IntakeSettings
from .i18n import N_

log = logging.getLogger(__name__)

# Pillow format ids tried on the bytes; identification is by content, so a file's name or declared content
# type never picks the decoder. Everything else stays out, above all EPS/PS (Pillow runs Ghostscript on
# them), PDF and SVG, and the long tail of rarely fuzzed decoders (ICO, PSD, PCX, FITS...).
ALLOWED_FORMATS: tuple[str, ...] = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
FORMAT_NAMES = "PNG, JPEG, WebP, GIF, BMP or TIFF"

# Transparent areas are filled with mid-grey: CLIP reads a black or white matte as part of the picture
# ("on a black background", "isolated on white") and that leaks into the prompt; grey biases it least.
BACKGROUND_RGB: tuple[int, int, int] = (128, 128, 128)

DEFAULT_LIMITS = IntakeSettings()

# Member-facing sentences held here are marked with N_ so the catalogue check (tests/test_i18n.py) sees them.
NOT_AN_IMAGE = N_("That file is not an image I can read ({formats}).").format(formats=FORMAT_NAMES)
EMPTY_FILE = N_("That file is empty.")
DAMAGED_IMAGE = N_("That image is damaged or incomplete, so I can't read it.")
# For bytes that start like an allowed format but that no decoder accepts: naming the format they claim reads
# better than "not an image" to a member who knows they sent a TIFF.
UNREADABLE_VARIANT = N_(
    "That {kind} file is damaged or uses a feature I can't read; try saving it again as PNG or JPEG."
)
# Running out of memory while decoding says nothing about the file being broken: a large but valid picture can
# meet a process already short of memory, so the member is told that rather than that the file is damaged.
TOO_MUCH_MEMORY = N_(
    "That image needs more memory to decode than I can spare; try sending a smaller version."
)

# What Pillow raises on malformed input. A decoder fed hostile bytes fails in many ways, each of them the
# file's fault; other exception types are bugs and propagate. MemoryError is not among them: it is not the
# file's fault, and _decode gives it its own sentence.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes UnidentifiedImageError and "image file is truncated"
    SyntaxError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    EOFError,
    ZeroDivisionError,
    OverflowError,
    struct.error,
)

_BOMB_PIXELS = re.compile(r"\((\d+) pixels\)")
_MB = 1024 * 1024
# Pixels converted at a time from deep (16-bit, 32-bit, float) images: numpy works on float64 copies, so a
# whole 40-megapixel image at once would cost over a gigabyte; bands of this size keep it to a few megabytes.
_BAND_PIXELS = 1 << 18

# What decoding costs in memory, per pixel (decode_cost). Pillow keeps RGB pixels in 32 bits, like RGBA;
# 1, L and P take a byte; 16-bit greys two. Measured peaks with Pillow 13 (25 megapixels, resident set): RGB
# and RGBA PNG or JPEG 8.0-8.1 bytes, L 5.1, I;16 7.2, P GIF 5.1, WebP 16.7-17.7 (libwebp decodes into
# buffers of its own before Pillow copies the frame).
_RGB_BYTES_PER_PIXEL = 4
_FRAME_BYTES_PER_PIXEL = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2}
_GIF_BYTES_PER_PIXEL = 1 + 4 + _RGB_BYTES_PER_PIXEL  # a palette frame, maybe an RGBA copy, the RGB result
_WEBP_BYTES_PER_PIXEL = 18

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ICC_SEGMENT = b"ICC_PROFILE\x00"


class ImageError(Exception):
    """An upload that cannot be used; the message is one sentence meant for the member who sent it."""


@dataclass(frozen=True)
class Intake:
    """A decoded upload: the picture to interrogate plus what callers need to cache and describe it."""

    image: Image.Image  # RGB, fully loaded, upright, first frame only
    sha256: str  # hex digest of the uploaded bytes
    format: str  # Pillow's id for what the bytes turned out to be: "PNG", "JPEG", "MPO", "WEBP", ...
    original_size: tuple[int, int]  # (width, height) as decoded, before EXIF rotation


def image_sha256(data: bytes) -> str:
    """Hex SHA-256 of the raw upload, the key under which its results are cached."""
    return hashlib.sha256(data).hexdigest()


def open_image(data: bytes, limits: IntakeSettings = DEFAULT_LIMITS) -> Image.Image:
    """Decode an upload into a fully loaded RGB image, or raise ImageError with a sentence for the user."""
    return _decode(data, limits)[0]


def load_intake(data: bytes, limits: IntakeSettings = DEFAULT_LIMITS) -> Intake:
    """Decode an upload like open_image and keep its hash, format and stored size alongside."""
    image, image_format, original_size = _decode(data, limits)
    return Intake(image=image, sha256=image_sha256(data), format=image_format, original_size=original_size)


# Declared types that are images to a browser but never to intake (vector or PostScript): no download.
_NEVER_DECODED_TYPES = frozenset(
    {
        "image/svg+xml",
        "image/svg",
        "image/x-eps",
        "image/eps",
        "image/x-postscript",
        "image/vnd.adobe.photoshop",
    }
)


def check_declared(
    size_bytes: int | None,
    width: int | None,
    height: int | None,
    content_type: str | None,
    limits: IntakeSettings = DEFAULT_LIMITS,
) -> None:
    """Reject an attachment from the metadata Discord sends with it, before spending a download on it.

    None (or an empty content type) means "not known" and passes; open_image checks the real bytes anyway.
    An embedded image declares no size: the download's own cap is what limits it.
    """
    if content_type is not None and content_type.strip():
        media_type = content_type.split(";", 1)[0].strip().lower()
        if not media_type.startswith("image/") or media_type in _NEVER_DECODED_TYPES:
            raise ImageError(NOT_AN_IMAGE)
    if size_bytes is not None:
        _check_byte_size(size_bytes, limits)
    if width is not None and height is not None:
        _check_dimensions(width, height, limits)
        return
    for side in (width, height):
        if side is not None and side > limits.max_side:
            raise ImageError(
                f"That image has a side of {side} pixels; "
                f"the longest side allowed is {limits.max_side} pixels."
            )


def check_image(data: bytes, limits: IntakeSettings = DEFAULT_LIMITS) -> None:
    """Check an upload as open_image does, short of decoding its pixels: size, format and dimensions.

    Only headers are parsed, so a whole folder can be checked before a model loads; a file that passes can
    still turn out damaged when its pixels are decoded.
    """
    with _memory_guard(len(data)):
        _open_within_limits(data, limits).close()


def decode_cost(data: bytes, limits: IntakeSettings = DEFAULT_LIMITS) -> int:
    """About how many bytes of memory decoding an upload holds at its peak, read from its headers alone.

    The decoded frame as Pillow stores it, plus the RGB picture made from it, plus what the conversion and
    the decoder need on the way. Raises ImageError for what open_image would refuse before decoding.
    GIF and WebP are sized from their own headers, since Pillow allocates their canvas while opening.
    """
    _check_byte_size(len(data), limits)
    if data[:6] in (b"GIF87a", b"GIF89a") or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
        canvas = _declared_canvas(data)
        if canvas is not None:
            _check_dimensions(*canvas, limits)
            per_pixel = _GIF_BYTES_PER_PIXEL if data[:3] == b"GIF" else _WEBP_BYTES_PER_PIXEL
            return canvas[0] * canvas[1] * per_pixel
    with _memory_guard(len(data)):
        source = _open_within_limits(data, limits)
    with source:
        width, height = source.size
        return width * height * _peak_bytes_per_pixel(source.mode, "transparency" in source.info)


def held_bytes(image: Image.Image) -> int:
    """What a decoded upload (RGB) holds in memory for as long as it is kept."""
    return image.width * image.height * _RGB_BYTES_PER_PIXEL


def _peak_bytes_per_pixel(mode: str, keyed: bool) -> int:
    frame = _FRAME_BYTES_PER_PIXEL.get(mode, 4)
    if mode in ("I", "F") or mode.startswith("I;16"):
        between = 2  # _deep_to_rgb's 8-bit grey and colour-key mask
    elif mode in ("LA", "La", "PA") or (keyed and mode not in ("RGBA", "RGBa")):
        between = 4  # the RGBA copy that carries the alpha
    else:
        between = 0
    return frame + between + _RGB_BYTES_PER_PIXEL


def _decode(data: bytes, limits: IntakeSettings) -> tuple[Image.Image, str, tuple[int, int]]:
    with _memory_guard(len(data)):
        source = _open_within_limits(data, limits)
        try:
            with source:
                # Only the current frame is decoded; the rest of an animation is never read or counted.
                source.load()
                image_format = source.format or "unknown"
                original_size = source.size
                return _to_rgb(_upright(source)), image_format, original_size
        except _DECODE_ERRORS as exc:
            log.debug("undecodable upload (%d bytes)", len(data), exc_info=True)
            raise ImageError(DAMAGED_IMAGE) from exc


@contextlib.contextmanager
def _memory_guard(size_bytes: int) -> Iterator[None]:
    try:
        yield
    except MemoryError as exc:
        # Raised wherever an allocation failed: opening (GIF and WebP allocate a canvas there), load() or the
        # conversion to RGB. The limits keep a valid picture to a few hundred megabytes, so this means the
        # process itself is short of memory; the operator needs to hear of it, not only the member.
        log.warning("out of memory decoding an upload (%d bytes)", size_bytes)
        raise ImageError(TOO_MUCH_MEMORY) from exc


def _open_within_limits(data: bytes, limits: IntakeSettings) -> Image.Image:
    """The upload opened lazily (headers only), once its byte size, format and dimensions pass."""
    _check_byte_size(len(data), limits)
    canvas = _declared_canvas(data)
    if canvas is not None:
        _check_dimensions(*canvas, limits)
    try:
        source = _open(data)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard (module-global MAX_IMAGE_PIXELS) fired before ours could. Its warning only
        # arrives here as an exception under an "error" warnings filter; filters are not changed here
        # because warnings.catch_warnings is process-global and unsafe across threads.
        raise ImageError(_bomb_message(str(exc), limits)) from exc
    except _DECODE_ERRORS as exc:
        # No decoder took the bytes, or one gave up inside the headers: name the format they claim, if any.
        kind = _claimed_format(data)
        raise ImageError(NOT_AN_IMAGE if kind is None else UNREADABLE_VARIANT.format(kind=kind)) from exc
    try:
        # Image.open only reads headers; the pixel buffer is allocated by load(), so check first.
        if min(source.size) < 1:
            raise ImageError(DAMAGED_IMAGE)
        _check_dimensions(*source.size, limits)
    except BaseException:
        source.close()
        raise
    return source


def _open(data: bytes) -> Image.Image:
    """Image.open restricted to the allowed formats, with a second try without the colour profiles.

    Pillow parses ICC profiles while opening and gives up on the whole file when one is malformed (a PNG
    iCCP chunk with an unknown compression method, a JPEG APP2 segment cut short), although the pixels
    are fine and browsers show them. Intake never applies profiles, so such files are opened again
    without them. A file that fails for another reason fails the same way twice and keeps its first error.
    """
    try:
        return Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except _DECODE_ERRORS as exc:  # UnidentifiedImageError among them
        first = exc
    stripped = _without_colour_profiles(data)
    if stripped is None:
        raise first
    try:
        return Image.open(io.BytesIO(stripped), formats=ALLOWED_FORMATS)
    except _DECODE_ERRORS:
        raise first from None


def _without_colour_profiles(data: bytes) -> bytes | None:
    """The bytes of a PNG or JPEG without its ICC profile chunks; None if it is neither or has none.

    What the walk cannot parse (a chunk or segment running past the end, anything after a JPEG's first
    scan) is kept unchanged for the decoder to judge.
    """
    if data.startswith(_PNG_SIGNATURE):
        return _png_without_iccp(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_without_icc(data)
    return None


def _png_without_iccp(data: bytes) -> bytes | None:
    kept = [data[:8]]
    pos = 8
    removed = False
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        end = pos + 12 + length
        if end > len(data):
            break
        kind = data[pos + 4 : pos + 8]
        if kind == b"iCCP":
            removed = True
        else:
            kept.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            break
    kept.append(data[pos:])
    return b"".join(kept) if removed else None


def _jpeg_without_icc(data: bytes) -> bytes | None:
    kept = [data[:2]]
    pos = 2
    removed = False
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            kept.append(data[pos : pos + 1])
            pos += 1
            continue
        if marker == 0xDA or marker == 0xD9 or 0xD0 <= marker <= 0xD8 or marker == 0x01:
            break  # start of scan, end of image, or a marker without a length: nothing more to drop
        (length,) = struct.unpack_from(">H", data, pos + 2)
        end = pos + 2 + length
        if length < 2 or end > len(data):
            break
        if marker == 0xE2 and data[pos + 4 : pos + 4 + len(_ICC_SEGMENT)] == _ICC_SEGMENT:
            removed = True
        else:
            kept.append(data[pos:end])
        pos = end
    kept.append(data[pos:])
    return b"".join(kept) if removed else None


def _claimed_format(data: bytes) -> str | None:
    """The allowed format whose signature the bytes start with, by its usual name; None if none."""
    if data.startswith(_PNG_SIGNATURE):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    # "BM" alone starts plenty of text; a BMP header also has four reserved zero bytes.
    if data[:2] == b"BM" and data[6:10] == bytes(4):
        return "BMP"
    return None


def _check_byte_size(size_bytes: int, limits: IntakeSettings) -> None:
    if size_bytes <= 0:
        raise ImageError(EMPTY_FILE)
    if size_bytes > limits.max_bytes:
        raise ImageError(
            f"That file is {_describe_bytes(size_bytes, round_up=True)}; "
            f"the limit is {_describe_bytes(limits.max_bytes, round_up=False)}."
        )


def _check_dimensions(width: int, height: int, limits: IntakeSettings) -> None:
    if width * height > limits.max_pixels:
        limit = _describe_pixels(limits.max_pixels)
        raise ImageError(f"That image is {width}×{height} pixels; the limit is {limit}.")
    if max(width, height) > limits.max_side:
        raise ImageError(
            f"That image is {width}×{height} pixels; the longest side allowed is {limits.max_side} pixels."
        )


def _bomb_message(pillow_message: str, limits: IntakeSettings) -> str:
    limit = _describe_pixels(limits.max_pixels)
    found = _BOMB_PIXELS.search(pillow_message)
    if found is None:
        return N_("That image has too many pixels; the limit is {limit}.").format(limit=limit)
    pixels = _describe_pixels(int(found.group(1)))
    return N_("That image is about {pixels}; the limit is {limit}.").format(pixels=pixels, limit=limit)


def _describe_pixels(pixels: int) -> str:
    if pixels < 100_000:
        return N_("{number} pixels").format(number=f"{pixels:,}")
    tenths = round(pixels / 100_000)
    number = f"{tenths // 10:,}" if tenths % 10 == 0 else f"{tenths / 10:,.1f}"
    return N_("{number} megapixels").format(number=number)


def _describe_bytes(size_bytes: int, *, round_up: bool) -> str:
    # Binary megabytes, labelled "MB" as Discord labels its own upload limits.
    # An oversized file rounds up, so it never reads as equal to the limit it broke.
    for unit, name in ((_MB, "MB"), (1024, "KB")):
        if size_bytes >= unit:
            tenths = size_bytes * 10 / unit
            value = (math.ceil(tenths) if round_up else round(tenths)) / 10
            return f"{value:g} {name}"
    return f"{size_bytes} bytes"


def _declared_canvas(data: bytes) -> tuple[int, int] | None:
    """The size a GIF, WebP or PNG header declares, read before Pillow sees the bytes; None otherwise.

    GIF and WebP are the decoders that allocate a canvas while *opening* (GIF's first-frame disposal
    buffer, libwebp's animation canvas), guarded inside Pillow only by the global Image.MAX_IMAGE_PIXELS;
    reading their size first makes our own limit hold even where that global is raised or disabled. PNG
    allocates nothing until load(), which the check after opening covers; reading its header here just
    lets a PNG bomb be described by its dimensions rather than by Pillow's pixel count.
    """
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return _gif_canvas(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return _webp_canvas(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack_from(">II", data, 16)
        return width, height
    return None


def _gif_canvas(data: bytes) -> tuple[int, int] | None:
    if len(data) < 13:
        return None
    width, height = struct.unpack_from("<HH", data, 6)
    flags = data[10]
    pos = 13
    if flags & 0x80:
        pos += 3 << ((flags & 7) + 1)
    # Walk to the first image descriptor exactly as Pillow's GIF reader does, quirks included: stray
    # bytes are skipped one at a time, and after an extension's first sub-block Pillow reads sub-blocks
    # until an empty one even when that first block was itself empty. A walk that followed the
    # specification instead could be steered to a decoy descriptor. A first frame reaching past the
    # logical screen grows the canvas, as in Pillow.
    while pos < len(data):
        block = data[pos]
        if block == 0x3B:  # trailer
            break
        if block == 0x2C:
            if pos + 9 >= len(data):
                break
            left, top, frame_width, frame_height = struct.unpack_from("<HHHH", data, pos + 1)
            return max(width, left + frame_width), max(height, top + frame_height)
        if block != 0x21:
            pos += 1
            continue
        label = data[pos + 1] if pos + 1 < len(data) else None
        first, pos = _gif_sub_block(data, pos + 2)
        if label == 0xFE:  # comment: stops at the first empty sub-block
            while first:
                first, pos = _gif_sub_block(data, pos)
            continue
        if label == 0xFF and first.startswith(b"NETSCAPE2.0"):
            _, pos = _gif_sub_block(data, pos)
        rest, pos = _gif_sub_block(data, pos)
        while rest:
            rest, pos = _gif_sub_block(data, pos)
    return width, height


def _gif_sub_block(data: bytes, pos: int) -> tuple[bytes, int]:
    """One GIF data sub-block at pos and the position after it; empty at a zero length byte or the end."""
    if pos >= len(data) or data[pos] == 0:
        return b"", pos + 1
    end = pos + 1 + data[pos]
    return data[pos + 1 : end], end


def _webp_canvas(data: bytes) -> tuple[int, int] | None:
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        width, height = struct.unpack_from("<HH", data, 26)
        return width & 0x3FFF, height & 0x3FFF
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    return None


def _upright(image: Image.Image) -> Image.Image:
    """Apply the EXIF orientation; metadata that cannot be parsed just leaves the image as stored.

    In place: the decoded file is ours alone, and Pillow's copying variant would duplicate every upright
    picture (most of them) only to throw the original away.
    """
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except _DECODE_ERRORS:
        log.debug("ignoring unreadable EXIF orientation", exc_info=True)
    return image


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded mode to RGB, transparent areas composited onto BACKGROUND_RGB, with no metadata.

    Nothing of the upload's metadata survives: Pillow's PNG and JPEG writers copy `info` (an ICC profile,
    a comment) into every file later saved from the image, which would carry whatever the upload held
    (a malformed profile, a script in a comment) into the bot's own thumbnails and stored sources.
    """
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        rgb = _deep_to_rgb(image)
    elif image.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in image.info:
        # P, L and RGB images carry transparency as a colour key in info; convert("RGBA") applies it.
        if image.mode == "La":  # premultiplied; Pillow converts it to nothing but LA
            image = image.convert("LA")
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        rgb = Image.new("RGB", rgba.size, BACKGROUND_RGB)
        rgb.paste(rgba, mask=rgba)
    else:
        # CMYK is converted without its ICC profile: parsing untrusted profiles is more attack surface than
        # the small colour shift is worth to CLIP.
        rgb = image.convert("RGB")
    rgb.info = {}
    return rgb


def _deep_to_rgb(image: Image.Image) -> Image.Image:
    """Map a 16-bit, 32-bit integer or float greyscale image onto 8-bit grey, colour key onto BACKGROUND_RGB.

    Pillow's own convert("L") clips these at 255 instead of scaling, which turns most 16-bit photos white.
    The work is done in bands of rows, so memory beyond the result stays small whatever the image's size.
    """
    width, height = image.size
    rows = max(1, _BAND_PIXELS // width)
    bands = [(top, min(height, top + rows)) for top in range(0, height, rows)]
    sixteen = image.mode.startswith("I;16")
    low = high = 0.0
    if not sixteen:
        # 32-bit integers and floats have no fixed range (a float TIFF may hold 0..1, 0..255 or physical
        # units), so the image's own finite min..max is stretched onto 0..255, NaN and -inf counting as the
        # minimum and +inf as the maximum. A flat image has no range to stretch and is taken as already on
        # the 0..255 scale.
        low, high = math.inf, -math.inf
        for top, bottom in bands:
            values = _band(image, top, bottom)
            finite = values[np.isfinite(values)]
            if finite.size:
                low, high = min(low, float(finite.min())), max(high, float(finite.max()))
        if low > high:
            low = high = 0.0
    key = image.info.get("transparency")
    keyed = isinstance(key, int) and not isinstance(key, bool)
    grey = Image.new("L", image.size)
    transparent = Image.new("L", image.size) if keyed else None
    for top, bottom in bands:
        values = _band(image, top, bottom)
        if sixteen:
            scaled = values / 257.0  # sixteen bits have a known range: 65535 / 257 = 255
        else:
            values = np.nan_to_num(values, nan=low, posinf=high, neginf=low)
            scaled = (values - low) / (high - low) * 255.0 if high > low else values
        grey.paste(Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8)), (0, top))
        if transparent is not None:
            transparent.paste(Image.fromarray(np.where(values == key, 255, 0).astype(np.uint8)), (0, top))
    rgb = grey.convert("RGB")
    del grey
    if transparent is not None:
        rgb.paste(BACKGROUND_RGB, mask=transparent)
    return rgb


def _band(image: Image.Image, top: int, bottom: int) -> np.ndarray:
    """Rows top..bottom as float64, which holds 16- and 32-bit integers exactly and cannot overflow when
    float32 extremes are subtracted."""
    return np.asarray(image.crop((0, top, image.width, bottom)), dtype=np.float64)
