"""Image bytes bounded by what the image needs, before a job is queued.

The gateway reads only an image's header (it never decompresses: no bomb can hurt it), so bytes appended after
the image's end would otherwise ride along into Redis and every worker: 10 MB of junk after a 1x1 PNG's ``IEND``
made 16 requests put 224 MB into one stream. ``trim`` cuts everything after the format's end (PNG ``IEND``,
JPEG ``EOI``, GIF trailer, the RIFF size of WebP, the BMP file size), walking the
structure with length fields only. ``check_size`` then refuses an image still larger than its pixels could
need in any encoding (junk inside the structure, or a format that cannot be walked).
"""

from __future__ import annotations

import base64

from PIL import Image

from broker_worker.protocol.errors import invalid
from broker_worker.protocol.images import ImageLimits, decode_base64, open_image

#: Room for metadata a real image carries (ICC profile, EXIF, thumbnails), on top of twice its raw pixels.
METADATA_ALLOWANCE = 1 << 20
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def trim(data: bytes) -> bytes:
    """The image without trailing bytes after its end; unchanged when the format is not walkable."""
    end = _end_of(data)
    return data[:end] if end is not None and end < len(data) else data


def check_size(data: bytes, image: Image.Image, index: int) -> None:
    raw = image.width * image.height * _bytes_per_pixel(image.mode)
    allowed = 2 * raw + METADATA_ALLOWANCE
    if len(data) > allowed:
        raise invalid(
            f"image {index}: {len(data)} bytes for {image.width}x{image.height} pixels; "
            f"an image of that size needs at most {allowed} bytes"
        )


def _bytes_per_pixel(mode: str) -> int:
    try:
        bands = Image.getmodebands(mode)
    except (KeyError, ValueError):  # a mode PIL reads but has no band count for: assume the widest
        bands = 4
    return bands * (2 if ";16" in mode else 4 if mode in ("I", "F") else 1)


def _end_of(data: bytes) -> int | None:
    if data.startswith(_PNG_SIGNATURE):
        return _png_end(data)
    if data.startswith(b"\xff\xd8"):
        return _jpeg_end(data)
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return _gif_end(data)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        size = int.from_bytes(data[4:8], "little")
        return 8 + size + (size & 1)
    if data[:2] == b"BM" and len(data) >= 6:
        return max(int.from_bytes(data[2:6], "little"), 26)
    return None


def _png_end(data: bytes) -> int | None:
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos : pos + 4], "big"), data[pos + 4 : pos + 8]
        pos += 12 + length  # length, type, data, CRC
        if kind == b"IEND":
            return pos
    return None


def _jpeg_end(data: bytes) -> int | None:
    """After SOI: marker segments with lengths; after each SOS, entropy-coded data up to the next marker that is
    neither a stuffed 0xFF00 nor a restart marker; EOI ends the image."""
    pos = 2
    while pos + 2 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
        elif marker == 0xD9:
            return pos + 2
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # standalone markers
            pos += 2
        else:
            pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
            if marker == 0xDA:
                pos = _after_scan(data, pos)
    return None


def _after_scan(data: bytes, pos: int) -> int:
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0 or pos + 1 >= len(data):
            return len(data)
        following = data[pos + 1]
        if following == 0x00 or 0xD0 <= following <= 0xD7:
            pos += 2
        elif following == 0xFF:
            pos += 1
        else:
            return pos


def _gif_end(data: bytes) -> int | None:
    """Header and global colour table, then extension and image blocks (each a chain of sub-blocks) up to the
    trailer."""
    if len(data) < 13:
        return None
    pos = 13 + _colour_table(data[10])
    while pos < len(data):
        block = data[pos]
        if block == 0x3B:
            return pos + 1
        if block == 0x21:  # extension: label, then sub-blocks
            pos = _skip_sub_blocks(data, pos + 2)
        elif block == 0x2C and pos + 10 <= len(data):  # image: descriptor, colour table, LZW size, sub-blocks
            pos = _skip_sub_blocks(data, pos + 10 + _colour_table(data[pos + 9]) + 1)
        else:
            return None
    return None


def _colour_table(flags: int) -> int:
    return 3 << ((flags & 7) + 1) if flags & 0x80 else 0


def _skip_sub_blocks(data: bytes, pos: int) -> int:
    while pos < len(data) and data[pos]:
        pos += data[pos] + 1
    return pos + 1


def bounded(b64: str, index: int, limits: ImageLimits) -> str:
    """An image of a request, base64: its header checked (nothing decompressed), the bytes after its end dropped,
    its size bounded by its pixels."""
    data = decode_base64(b64, index, limits)
    image = open_image(data, index, limits, load=False)
    trimmed = trim(data)
    check_size(trimmed, image, index)
    return b64 if len(trimmed) == len(data) else base64.b64encode(trimmed).decode()
