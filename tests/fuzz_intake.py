r"""Fuzzing image intake: structure-aware mutators per format, a seed corpus, and an atheris entry point.

The property is intake's whole contract: any bytes decode to an RGB image or raise ImageError with one
sentence; any other exception, a crash or a hang is a finding. tests/test_images.py runs the same mutators
under hypothesis with a bounded number of examples on every test run, and replays a fixed corpus built with
them under a memory and CPU-time cap (replay_bounded). For open-ended, coverage-guided runs (atheris is
libFuzzer for Python; it has wheels for CPython 3.11 on Linux):

    .venv/bin/pip install atheris
    .venv/bin/python -m tests.fuzz_intake -max_total_time=300 -timeout=10 -rss_limit_mb=2048 \
        -artifact_prefix=/tmp/i2p2i-fuzz/ fuzz-corpus/

from the repository root. The seed corpus is written into the corpus folder (created if missing) before the
run; libFuzzer keeps the inputs that found new coverage there and writes an input that broke the property
to /tmp/i2p2i-fuzz/crash-<sha1> (the artifact prefix, a folder created if missing; without one libFuzzer
writes into the working directory, here the repository), which `python -m tests.fuzz_intake
/tmp/i2p2i-fuzz/crash-<sha1>` replays. Half of the mutations are libFuzzer's own byte-level ones; the other
half understand the container (PNG chunks with valid CRCs, GIF blocks, JPEG segments, TIFF directory
entries, RIFF chunks, BMP header fields), so they get past the checksums and framing that random bytes
almost never survive.
"""

from __future__ import annotations

import io
import os
import random
import re
import struct
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from i2p2i_bot.config import IntakeSettings
from i2p2i_bot.images import ImageError, open_image

# Tight limits keep each input fast: a mutated header may legally declare a large canvas. The property does
# not depend on where the limits sit; the memory bound at the real limits is tested separately.
FUZZ_LIMITS = IntakeSettings(max_pixels=250_000, max_side=4096)
_SECOND_SENTENCE = re.compile(r"[.!?] [A-Z]")

Mutator = Callable[[bytes, random.Random], bytes]


def check_intake(data: bytes, limits: IntakeSettings = FUZZ_LIMITS) -> str:
    """Decode and say which of the two allowed outcomes happened; anything else propagates."""
    return "image" if isinstance(intake_outcome(data, limits), Image.Image) else "error"


def intake_outcome(data: bytes, limits: IntakeSettings = FUZZ_LIMITS) -> Image.Image | str:
    """The normalised image, or the one sentence of the ImageError; any other exception propagates."""
    try:
        image = open_image(data, limits)
    except ImageError as exc:
        message = str(exc)
        assert message.endswith(".") and "\n" not in message, message
        assert not _SECOND_SENTENCE.search(message), message
        return message
    assert image.mode == "RGB" and min(image.size) >= 1, (image.mode, image.size)
    assert image.info == {}, image.info
    return image


# --- seeds --------------------------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **options: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _gradient(width: int = 16, height: int = 12) -> Image.Image:
    values = (np.arange(width * height * 3) * 7 % 251).astype(np.uint8)
    return Image.fromarray(values.reshape(height, width, 3))


def seed_corpus() -> dict[str, bytes]:
    """Small valid files covering each allowed format's main variants."""
    picture = _gradient()
    turned = picture.rotate(180)
    paletted = picture.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    sixteen = Image.fromarray((np.arange(16 * 12, dtype=np.uint16) * 341).reshape(12, 16))
    rgba = picture.convert("RGBA")
    rgba.putalpha(128)
    return {
        "png": _encode(picture, "PNG"),
        "png-palette-trns": _encode(paletted, "PNG", transparency=0),
        "png-16bit": _encode(sixteen, "PNG"),
        "png-rgba": _encode(rgba, "PNG"),
        "png-interlaced": _encode(picture, "PNG", interlace=1),
        "apng": _encode(picture, "PNG", save_all=True, append_images=[turned]),
        "jpeg": _encode(picture, "JPEG"),
        "jpeg-progressive": _encode(picture, "JPEG", progressive=True),
        "jpeg-cmyk": _encode(picture.convert("CMYK"), "JPEG"),
        "jpeg-grey": _encode(picture.convert("L"), "JPEG"),
        "mpo": _encode(picture, "MPO", save_all=True, append_images=[turned]),
        "gif": _encode(picture, "GIF"),
        "gif-animated": _encode(picture, "GIF", save_all=True, append_images=[turned], duration=50),
        "bmp": _encode(picture, "BMP"),
        "bmp-palette": _encode(paletted, "BMP"),
        "bmp-1bit": _encode(picture.convert("1"), "BMP"),
        "bmp-rgba": _encode(rgba, "BMP"),
        "webp": _encode(picture, "WEBP"),
        "webp-lossless": _encode(rgba, "WEBP", lossless=True),
        "webp-animated": _encode(picture, "WEBP", save_all=True, append_images=[turned], lossless=True),
        "tiff": _encode(picture, "TIFF"),
        "tiff-lzw": _encode(picture, "TIFF", compression="tiff_lzw"),
        "tiff-jpeg": _encode(picture, "TIFF", compression="jpeg"),
        "tiff-16bit": _encode(sixteen, "TIFF"),
        "tiff-float": _encode(
            Image.fromarray(np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8)), "TIFF"
        ),
        "tiff-cmyk": _encode(picture.convert("CMYK"), "TIFF"),
    }


# --- shared helpers -----------------------------------------------------------------------------------------


def _random_bytes(rng: random.Random, low: int, high: int) -> bytes:
    return rng.randbytes(rng.randint(low, high))


def _interesting(rng: random.Random, bits: int) -> int:
    """A value chosen the way fuzzers like: edges and small numbers more often than uniform noise."""
    top = (1 << bits) - 1
    return rng.choice([0, 1, 2, 7, 8, 16, 255, 256, 300, top, top - 1, top >> 1, rng.randint(0, top)]) & top


def _mutate_list(items: list[Any], rng: random.Random, make: Callable[[random.Random], Any] | None) -> None:
    """Delete, duplicate, swap or insert one element, in place."""
    choice = rng.randrange(4)
    if choice == 0 and items:
        del items[rng.randrange(len(items))]
    elif choice == 1 and items:
        position = rng.randrange(len(items))
        items.insert(rng.randrange(len(items) + 1), items[position])
    elif choice == 2 and len(items) > 1:
        i, j = rng.randrange(len(items)), rng.randrange(len(items))
        items[i], items[j] = items[j], items[i]
    elif make is not None:
        items.insert(rng.randrange(len(items) + 1), make(rng))


def _poke(body: bytes, rng: random.Random) -> bytes:
    """Change one byte (a random value or one flipped bit), or cut the body short."""
    if not body:
        return rng.randbytes(rng.randint(0, 4))
    data = bytearray(body)
    position = rng.randrange(len(data))
    choice = rng.randrange(3)
    if choice == 0:
        data[position] = rng.randrange(256)
    elif choice == 1:
        data[position] ^= 1 << rng.randrange(8)
    else:
        del data[position:]
    return bytes(data)


def byte_mutation(data: bytes, rng: random.Random) -> bytes:
    """Format-blind changes: flipped bits, overwritten or repeated runs, truncation."""
    out = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        if not out:
            out += rng.randbytes(8)
        position = rng.randrange(len(out))
        choice = rng.randrange(5)
        if choice == 0:
            out[position] ^= 1 << rng.randrange(8)
        elif choice == 1:
            out[position] = rng.choice([0x00, 0xFF, 0x7F, 0x80, rng.randrange(256)])
        elif choice == 2:
            run = out[position : position + rng.randint(1, 32)]
            out[position:position] = run * rng.randint(1, 8)
        elif choice == 3:
            del out[position : position + rng.randint(1, 32)]
        else:
            del out[position:]
    return bytes(out)


# --- PNG: chunks with valid lengths and CRCs ----------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunks(data: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The chunks of a PNG as (type, body), and whatever followed the last whole chunk."""
    chunks: list[tuple[bytes, bytes]] = []
    pos = len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        if pos + 12 + length > len(data):
            break
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks, data[pos:]


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_assemble(chunks: list[tuple[bytes, bytes]], tail: bytes = b"") -> bytes:
    return PNG_SIGNATURE + b"".join(png_chunk(kind, body) for kind, body in chunks) + tail


def _exif_body(rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        exif = Image.Exif()
        exif[0x0112] = _interesting(rng, 16)
        return exif.tobytes()
    head = rng.choice([b"II*\x00", b"MM\x00*"])
    return head + struct.pack("<I", _interesting(rng, 32)) + _random_bytes(rng, 0, 40)


def _png_extra_chunk(rng: random.Random) -> tuple[bytes, bytes]:
    kinds = [b"iCCP", b"iCCP", b"eXIf", b"tRNS", b"PLTE", b"acTL", b"fcTL", b"fdAT", b"zTXt", b"iTXt"]
    kind = rng.choice([*kinds, b"sBIT", b"gAMA", b"IDAT", b"IEND", b"IHDR", b"tEXt", rng.randbytes(4)])
    if kind == b"iCCP":
        method = rng.choice([b"\x00", b"\x00", b"\x01", bytes([rng.randrange(256)])])
        profile = (
            zlib.compress(_random_bytes(rng, 0, 300)) if rng.random() < 0.7 else _random_bytes(rng, 0, 64)
        )
        return kind, b"icc" + rng.choice([b"\x00", b""]) + method + profile
    if kind == b"eXIf":
        return kind, _exif_body(rng)
    if kind == b"PLTE":
        return kind, _random_bytes(rng, 0, 3 * 260)
    if kind == b"acTL":
        return kind, struct.pack(">II", _interesting(rng, 32), _interesting(rng, 32))
    if kind == b"fcTL":
        fields = [_interesting(rng, 32) for _ in range(5)] + [_interesting(rng, 16) for _ in range(2)]
        return kind, struct.pack(">IIIIIHH", *fields) + bytes([rng.randrange(4), rng.randrange(3)])
    if kind == b"fdAT":
        return kind, struct.pack(">I", rng.randrange(8)) + zlib.compress(_random_bytes(rng, 0, 200))
    if kind in (b"zTXt", b"iTXt"):
        return kind, b"k\x00" + bytes([rng.randrange(2), 0]) + zlib.compress(_random_bytes(rng, 0, 200))
    if kind == b"IDAT":
        return kind, zlib.compress(_random_bytes(rng, 0, 400))
    if kind == b"IHDR":
        return kind, _random_ihdr(rng)
    return kind, _random_bytes(rng, 0, 16)


def _random_ihdr(rng: random.Random) -> bytes:
    width, height = (rng.choice([0, 1, 2, 16, 64, rng.randint(0, 300)]) for _ in range(2))
    depth = rng.choice([1, 2, 4, 8, 16, rng.randrange(256)])
    colour = rng.choice([0, 2, 3, 4, 6, rng.randrange(256)])
    return struct.pack(">IIBBBBB", width, height, depth, colour, 0, rng.choice([0, 0, 1]), rng.choice([0, 1]))


def _png_rescan(chunks: list[tuple[bytes, bytes]], rng: random.Random) -> None:
    """Inflate the image data, change the scanlines (filter bytes included), and deflate it again."""
    idat = [i for i, (kind, _) in enumerate(chunks) if kind == b"IDAT"]
    if not idat:
        return
    try:
        raw = zlib.decompress(b"".join(chunks[i][1] for i in idat))
    except zlib.error:
        return
    changed = zlib.compress(byte_mutation(raw, rng) if raw else rng.randbytes(8))
    chunks[idat[0]] = (b"IDAT", changed)
    for i in reversed(idat[1:]):
        del chunks[i]


def mutate_png(data: bytes, rng: random.Random) -> bytes:
    chunks, tail = png_chunks(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(5)
        if choice == 0 and chunks:
            i = rng.randrange(len(chunks))
            chunks[i] = (chunks[i][0], _poke(chunks[i][1], rng))
        elif choice == 1:
            _mutate_list(chunks, rng, _png_extra_chunk)
        elif choice == 2 and chunks and chunks[0][0] == b"IHDR":
            chunks[0] = (b"IHDR", _random_ihdr(rng))
        elif choice == 3:
            _png_rescan(chunks, rng)
        else:
            tail = rng.choice([b"", tail, b"PK\x03\x04" + _random_bytes(rng, 0, 40), b"<html>"])
    return png_assemble(chunks, tail)


# --- GIF: header, logical screen and blocks -----------------------------------------------------------------


def gif_blocks(data: bytes) -> tuple[bytes, list[bytes], bytes]:
    """Header with screen descriptor and global palette, the extension and image blocks, and the rest."""
    if len(data) < 13:
        return data, [], b""
    pos = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    head = data[:pos]
    blocks: list[bytes] = []
    while pos < len(data) and data[pos] in (0x21, 0x2C):
        start = pos
        if data[pos] == 0x21:
            pos += 2
        else:
            flags = data[pos + 9] if pos + 9 < len(data) else 0
            pos += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1
        while pos < len(data) and data[pos]:
            pos += 1 + data[pos]
        pos += 1
        if pos > len(data):
            pos = start
            break
        blocks.append(data[start:pos])
    return head, blocks, data[pos:]


def _sub_blocks(payload: bytes) -> bytes:
    out = bytearray()
    for start in range(0, len(payload), 255):
        piece = payload[start : start + 255]
        out += bytes([len(piece)]) + piece
    return bytes(out + b"\x00")


def _gif_extension(rng: random.Random) -> bytes:
    label = rng.choice([0xF9, 0xFF, 0xFE, 0x01, rng.randrange(256)])
    if label == 0xF9:
        fields = (
            bytes([rng.randrange(256)])
            + struct.pack("<H", _interesting(rng, 16))
            + bytes([rng.randrange(256)])
        )
        return b"\x21\xf9" + bytes([rng.choice([4, 4, 0, 3, 255])]) + fields + b"\x00"
    if label == 0xFF:
        name = rng.choice([b"NETSCAPE2.0", b"ANIMEXTS1.0", b"ICCRGBG1012", b"XMP DataXMP", rng.randbytes(11)])
        return b"\x21\xff" + bytes([len(name)]) + name + _sub_blocks(_random_bytes(rng, 0, 300))
    return b"\x21" + bytes([label]) + _sub_blocks(_random_bytes(rng, 0, 300))


def _gif_descriptor(block: bytes, rng: random.Random) -> bytes:
    data = bytearray(block)
    if len(data) < 11:
        return bytes(data)
    field = rng.randrange(6)
    if field < 4:
        struct.pack_into("<H", data, 1 + 2 * field, rng.choice([0, 1, 16, 255, rng.randint(0, 300)]))
    elif field == 4:
        data[9] = rng.randrange(256)
    else:
        code_size_at = 10 + (3 << ((data[9] & 7) + 1) if data[9] & 0x80 else 0)
        if code_size_at < len(data):
            data[code_size_at] = rng.choice([0, 1, 2, 8, 11, 12, 13, 255])
    return bytes(data)


def mutate_gif(data: bytes, rng: random.Random) -> bytes:
    head, blocks, tail = gif_blocks(data)
    head_bytes = bytearray(head)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(5)
        if choice == 0 and len(head_bytes) >= 13:
            field = rng.randrange(3)
            if field < 2:
                struct.pack_into("<H", head_bytes, 6 + 2 * field, rng.choice([0, 1, 16, rng.randint(0, 300)]))
            else:
                head_bytes[10] = rng.randrange(256)
        elif choice == 1:
            _mutate_list(blocks, rng, _gif_extension)
        elif choice == 2 and blocks:
            i = rng.randrange(len(blocks))
            blocks[i] = _gif_descriptor(blocks[i], rng) if blocks[i][:1] == b"," else _poke(blocks[i], rng)
        elif choice == 3 and blocks:
            i = rng.randrange(len(blocks))
            blocks[i] = _poke(blocks[i], rng)
        else:
            tail = rng.choice([b"", b";", tail, b";*/=alert(1);"])
    return bytes(head_bytes) + b"".join(blocks) + tail


# --- JPEG: marker segments before the first scan ------------------------------------------------------------


def jpeg_segments(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """(marker, body) for each segment after SOI up to the first scan, and everything from there on."""
    segments: list[tuple[int, bytes]] = []
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF and data[pos + 1] not in (0xDA, 0xD9, 0xFF, 0x00):
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if length < 2 or pos + 2 + length > len(data):
            break
        segments.append((data[pos + 1], data[pos + 4 : pos + 2 + length]))
        pos += 2 + length
    return segments, data[pos:]


def jpeg_assemble(segments: list[tuple[int, bytes]], rest: bytes) -> bytes:
    out = bytearray(b"\xff\xd8")
    for marker, body in segments:
        body = body[:65533]
        out += bytes([0xFF, marker]) + struct.pack(">H", len(body) + 2) + body
    return bytes(out + rest)


def _jpeg_extra_segment(rng: random.Random) -> tuple[int, bytes]:
    marker = rng.choice([0xE1, 0xE2, 0xE2, 0xEE, 0xFE, 0xDB, 0xC4, 0xDD, 0xE0, rng.randrange(0xC0, 0xFF)])
    if marker == 0xE1:
        return marker, b"Exif\x00\x00" + _exif_body(rng)
    if marker == 0xE2:
        sequence = bytes([rng.choice([0, 1, 2, 255]), rng.choice([0, 1, 2, 255])])
        return marker, b"ICC_PROFILE\x00" + rng.choice([sequence, b"", sequence[:1]]) + _random_bytes(
            rng, 0, 200
        )
    if marker == 0xEE:
        return marker, b"Adobe" + rng.randbytes(6) + bytes([rng.randrange(4)])
    if marker == 0xFE:
        return marker, rng.choice([b"<?php system($_GET['c']); ?>", _random_bytes(rng, 0, 64)])
    return marker, _random_bytes(rng, 0, 80)


def _jpeg_frame(body: bytes, rng: random.Random) -> bytes:
    data = bytearray(body)
    if len(data) < 7:
        return _poke(body, rng)
    field = rng.randrange(4)
    if field == 0:
        data[0] = rng.choice([8, 12, 16, 0, 255])
    elif field == 1:
        struct.pack_into(">H", data, 1 + 2 * rng.randrange(2), rng.choice([0, 1, 16, rng.randint(0, 300)]))
    elif field == 2:
        data[5] = rng.choice([0, 1, 2, 3, 4, 5, 255])  # number of components
    else:
        data[rng.randrange(6, len(data))] = rng.randrange(256)  # a component's id, sampling or table
    return bytes(data)


def mutate_jpeg(data: bytes, rng: random.Random) -> bytes:
    segments, rest = jpeg_segments(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(5)
        if choice == 0 and segments:
            i = rng.randrange(len(segments))
            marker, body = segments[i]
            frame = 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)
            segments[i] = (marker, _jpeg_frame(body, rng) if frame else _poke(body, rng))
        elif choice == 1:
            _mutate_list(segments, rng, _jpeg_extra_segment)
        elif choice == 2 and segments:
            i = rng.randrange(len(segments))
            segments[i] = (rng.choice([0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC9, 0xCB, 0xF7]), segments[i][1])
        elif choice == 3:
            rest = byte_mutation(rest, rng)
        else:
            rest = rest + rng.choice([b"<?php phpinfo(); ?>", b"%PDF-1.4\n", b"\xff\xd8\xff\xe0"])
    return jpeg_assemble(segments, rest)


# --- TIFF: the first image file directory -------------------------------------------------------------------

_TIFF_TAGS = (256, 257, 258, 259, 262, 266, 273, 274, 277, 278, 279, 284, 317, 320, 322, 323, 324, 325)
_TIFF_TAGS_MORE = (330, 338, 339, 347, 34665, 34675, 530, 531, 532)


def tiff_directory(data: bytes) -> tuple[str, list[bytes], int] | None:
    """Byte order, the 12-byte entries of the first directory, and its offset; None if not a TIFF."""
    if data[:4] not in (b"II*\x00", b"MM\x00*") or len(data) < 8:
        return None
    order = "<" if data[:2] == b"II" else ">"
    (offset,) = struct.unpack_from(order + "I", data, 4)
    if offset + 2 > len(data):
        return None
    (count,) = struct.unpack_from(order + "H", data, offset)
    end = min(len(data), offset + 2 + 12 * count)
    entries = [data[p : p + 12] for p in range(offset + 2, end - 11, 12)]
    return order, entries, offset


def _tiff_entry(order: str, rng: random.Random, tag: int | None = None) -> bytes:
    tag = rng.choice(_TIFF_TAGS + _TIFF_TAGS_MORE) if tag is None else tag
    kind = rng.choice([1, 2, 3, 3, 4, 4, 5, 7, 11, 12, 16, rng.randrange(20)])
    count = rng.choice([0, 1, 1, 1, 2, 3, 4, 65535, _interesting(rng, 32)])
    value = rng.choice(
        [struct.pack(order + "I", _interesting(rng, 32)), struct.pack(order + "HH", _interesting(rng, 16), 0)]
    )
    return struct.pack(order + "HHI", tag, kind, count) + value


def mutate_tiff(data: bytes, rng: random.Random) -> bytes:
    parsed = tiff_directory(data)
    if parsed is None:
        return byte_mutation(data, rng)
    order, entries, _ = parsed
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(4)
        if choice == 0 and entries:
            i = rng.randrange(len(entries))
            (tag,) = struct.unpack_from(order + "H", entries[i])
            entries[i] = (
                _tiff_entry(order, rng, tag)
                if rng.random() < 0.5
                else _poke(entries[i], rng).ljust(12, b"\0")
            )
        elif choice == 1 and entries:
            i = rng.randrange(len(entries))
            entry = bytearray(entries[i])
            struct.pack_into(order + "I", entry, 8, _interesting(rng, 32) if rng.random() < 0.5 else 1)
            entries[i] = bytes(entry)
        elif choice == 2:
            _mutate_list(entries, rng, lambda r: _tiff_entry(order, r))
        else:
            entries.sort(key=lambda e: struct.unpack_from(order + "H", e)[0])
    # The new directory goes at the end, so every offset into the old file stays valid.
    offset = len(data) + (len(data) & 1)
    next_ifd = rng.choice([0, 0, 0, offset, 8, _interesting(rng, 32)])
    directory = (
        struct.pack(order + "H", len(entries)) + b"".join(entries) + struct.pack(order + "I", next_ifd)
    )
    head = data[:4] + struct.pack(order + "I", offset)
    return head + data[8:] + b"\0" * (len(data) & 1) + directory


# --- WebP: RIFF chunks --------------------------------------------------------------------------------------


def riff_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks: list[tuple[bytes, bytes]] = []
    pos = 12
    while pos + 8 <= len(data):
        (size,) = struct.unpack_from("<I", data, pos + 4)
        chunks.append((data[pos : pos + 4], data[pos + 8 : pos + 8 + size]))
        pos += 8 + size + (size & 1)
    return chunks


def riff_assemble(chunks: list[tuple[bytes, bytes]], declared: int | None = None) -> bytes:
    body = b"".join(
        kind + struct.pack("<I", len(payload)) + payload + b"\0" * (len(payload) & 1)
        for kind, payload in chunks
    )
    size = len(body) + 4 if declared is None else declared
    return b"RIFF" + struct.pack("<I", size & 0xFFFFFFFF) + b"WEBP" + body


def _webp_extra_chunk(rng: random.Random) -> tuple[bytes, bytes]:
    kind = rng.choice([b"ICCP", b"EXIF", b"XMP ", b"ALPH", b"ANIM", b"ANMF", b"VP8X", b"VP8L", b"VP8 "])
    if kind == b"EXIF":
        return kind, rng.choice([b"Exif\x00\x00", b""]) + _exif_body(rng)
    if kind == b"VP8X":
        canvas = (rng.randint(0, 300)).to_bytes(3, "little") + (rng.randint(0, 300)).to_bytes(3, "little")
        return kind, bytes([rng.randrange(256)]) + bytes(3) + canvas
    if kind == b"ANMF":
        fields = b"".join(rng.randint(0, 40).to_bytes(3, "little") for _ in range(5))
        return kind, fields + bytes([rng.randrange(4)]) + _random_bytes(rng, 0, 60)
    return kind, _random_bytes(rng, 0, 80)


def mutate_webp(data: bytes, rng: random.Random) -> bytes:
    chunks = riff_chunks(data)
    declared: int | None = None
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(4)
        if choice == 0 and chunks:
            i = rng.randrange(len(chunks))
            chunks[i] = (chunks[i][0], _poke(chunks[i][1], rng))
        elif choice == 1:
            _mutate_list(chunks, rng, _webp_extra_chunk)
        elif choice == 2 and chunks and chunks[0][0] == b"VP8X":
            body = bytearray(chunks[0][1].ljust(10, b"\0"))
            body[0] = rng.randrange(256)
            body[4:10] = rng.randint(0, 300).to_bytes(3, "little") + rng.randint(0, 300).to_bytes(3, "little")
            chunks[0] = (b"VP8X", bytes(body))
        else:
            declared = _interesting(rng, 32)
    return riff_assemble(chunks, declared)


# --- BMP: file and info header fields -----------------------------------------------------------------------


def mutate_bmp(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data.ljust(54, b"\0"))
    for _ in range(rng.randint(1, 4)):
        field = rng.randrange(8)
        if field == 0:
            struct.pack_into("<i", out, 18, rng.choice([0, 1, -1, 16, rng.randint(-300, 300)]))
        elif field == 1:
            struct.pack_into("<i", out, 22, rng.choice([0, 1, -1, -12, 12, rng.randint(-300, 300)]))
        elif field == 2:
            struct.pack_into("<H", out, 28, rng.choice([0, 1, 2, 4, 8, 16, 24, 32, 64, rng.randrange(65536)]))
        elif field == 3:
            struct.pack_into("<I", out, 30, rng.choice([0, 1, 2, 3, 4, 5, 6, rng.randrange(1 << 32)]))
        elif field == 4:
            struct.pack_into("<I", out, 46, _interesting(rng, 32))  # colours used
        elif field == 5:
            struct.pack_into("<I", out, 10, _interesting(rng, 32))  # pixel data offset
        elif field == 6:
            struct.pack_into("<I", out, 14, rng.choice([12, 40, 52, 56, 64, 108, 124, _interesting(rng, 32)]))
        else:
            return byte_mutation(bytes(out), rng)
    return bytes(out)


# --- dispatch -----------------------------------------------------------------------------------------------


def structured_mutation(data: bytes, rng: random.Random) -> bytes:
    """A mutation that keeps the container's framing valid, chosen by the bytes' signature."""
    if data.startswith(PNG_SIGNATURE):
        return mutate_png(data, rng)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return mutate_gif(data, rng)
    if data[:2] == b"\xff\xd8":
        return mutate_jpeg(data, rng)
    if data[:4] in (b"II*\x00", b"MM\x00*"):
        return mutate_tiff(data, rng)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return mutate_webp(data, rng)
    if data[:2] == b"BM":
        return mutate_bmp(data, rng)
    return byte_mutation(data, rng)


# --- bounded replay -----------------------------------------------------------------------------------------

# One corpus record: name length, the three limits, data length; then the name (UTF-8) and the data.
_RECORD = struct.Struct("<HQQQI")


def write_corpus(path: Path, inputs: Iterable[tuple[str, bytes, IntakeSettings]]) -> None:
    """Store named inputs, each with the limits it is decoded under, for replay_bounded to read."""
    with path.open("wb") as out:
        for name, data, limits in inputs:
            encoded = name.encode()
            out.write(
                _RECORD.pack(len(encoded), limits.max_bytes, limits.max_pixels, limits.max_side, len(data))
            )
            out.write(encoded + data)


def read_corpus(path: Path) -> Iterator[tuple[str, bytes, IntakeSettings]]:
    blob = path.read_bytes()
    pos = 0
    while pos < len(blob):
        name_length, max_bytes, max_pixels, max_side, data_length = _RECORD.unpack_from(blob, pos)
        pos += _RECORD.size
        name = blob[pos : pos + name_length].decode()
        pos += name_length
        limits = IntakeSettings(max_bytes=max_bytes, max_pixels=max_pixels, max_side=max_side)
        yield name, blob[pos : pos + data_length], limits
        pos += data_length


class _Memory:
    """This process's memory figures from /proc. The files stay open: opening them costs far more than
    reading, and every input of a corpus reads them twice."""

    def __init__(self) -> None:
        self._status = os.open("/proc/self/status", os.O_RDONLY)
        self._clear_refs = os.open("/proc/self/clear_refs", os.O_WRONLY)

    def read(self, field: str) -> int:
        """A VmSize, VmRSS or VmHWM line of /proc/self/status, in bytes."""
        status = os.pread(self._status, 16384, 0)
        return int(status.split(b"\n" + field.encode() + b":", 1)[1].split()[0]) * 1024

    def restart_peak(self) -> None:
        os.write(self._clear_refs, b"5")  # the peak (VmHWM) starts again from the current resident size


def replay_bounded(corpus: Path, report: Path, headroom_bytes: int, kill_after_cpu_s: float) -> None:
    """Decode every input of a corpus file under a memory cap and a CPU-time cap, one JSON line each.

    Meant for a fresh interpreter of its own (Linux only; tests/test_images.py starts one). RLIMIT_AS caps
    the whole address space at what the interpreter holds after its imports plus headroom_bytes, so
    Pillow's and libwebp's C allocations count, which tracemalloc never sees, and one over the cap fails
    inside the decoder as MemoryError instead of taking the machine's memory. RLIMIT_CPU is moved before
    each input so that one spinning for kill_after_cpu_s ends the process (SIGXCPU), even inside C code
    that never returns to Python; the lines already written then say which input it was. CPU time is
    measured rather than wall time, which other work on a shared machine would inflate.

    The first line describes the cap; each later one has the input's name, outcome ("image", "error" or
    "exception"), sentence or size, CPU seconds, and peak resident memory growth in bytes.
    """
    import json
    import math
    import resource
    import time

    # A process killed by SIGXCPU would otherwise leave a core file in the working directory.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    # Decode every seed once first, so the decoders' lazily imported modules and libraries are in the
    # baseline rather than charged to the first input that needs them.
    for data in seed_corpus().values():
        intake_outcome(data)
    memory = _Memory()
    baseline = memory.read("VmSize")
    cap = baseline + headroom_bytes
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.RLIM_INFINITY))
    try:
        bytearray(headroom_bytes + 32 * 2**20)  # the headroom and a little: what the cap must refuse
        cap_holds = False
    except MemoryError:
        cap_holds = True
    with report.open("w") as out:

        def line(record: dict[str, object]) -> None:
            out.write(json.dumps(record) + "\n")
            out.flush()

        line(
            {
                "baseline_vm_bytes": baseline,
                "cap_bytes": cap,
                "cap_holds": cap_holds,
                "torch_loaded": "torch" in sys.modules,
            }
        )
        for name, data, limits in read_corpus(corpus):
            usage = resource.getrusage(resource.RUSAGE_SELF)
            spent_s = usage.ru_utime + usage.ru_stime
            resource.setrlimit(
                resource.RLIMIT_CPU, (math.ceil(spent_s + kill_after_cpu_s), resource.RLIM_INFINITY)
            )
            memory.restart_peak()
            before = memory.read("VmRSS")
            started = time.process_time()
            record = {"name": name, **_replay_one(data, limits)}
            record["cpu_s"] = time.process_time() - started
            record["rss_growth_bytes"] = memory.read("VmHWM") - before
            line(record)


def _replay_one(data: bytes, limits: IntakeSettings) -> dict[str, object]:
    # A function of its own so that the decoded image is freed on return, before the next input starts.
    try:
        outcome = intake_outcome(data, limits)
    except Exception as exc:  # reported, not raised: the rest of the corpus still runs
        return {"outcome": "exception", "message": repr(exc)}
    if isinstance(outcome, str):
        return {"outcome": "error", "message": outcome}
    return {"outcome": "image", "mode": outcome.mode, "size": list(outcome.size)}


# --- atheris ------------------------------------------------------------------------------------------------


def _test_one_input(data: bytes) -> None:
    check_intake(data)


def _custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    if rng.random() < 0.5:
        import atheris

        return bytes(atheris.Mutate(data, max_size))
    return structured_mutation(data, rng)[:max_size]


def main(argv: list[str]) -> None:
    import atheris

    folders = [Path(arg) for arg in argv[1:] if not arg.startswith("-")]
    for arg in argv[1:]:
        # libFuzzer writes crash files under the prefix but does not create its folder.
        if arg.startswith("-artifact_prefix=") and arg.endswith("/"):
            Path(arg.split("=", 1)[1]).mkdir(parents=True, exist_ok=True)
    for folder in folders:
        if not folder.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            for name, data in seed_corpus().items():
                (folder / f"seed-{name}").write_bytes(data)
    # Coverage feedback from Pillow's pure-Python parsers and from intake itself.
    atheris.instrument_all()
    atheris.Setup(argv, _test_one_input, custom_mutator=_custom_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
