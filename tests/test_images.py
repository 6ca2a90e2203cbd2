from __future__ import annotations

import base64
import io
import struct
import zlib

import pytest
from PIL import Image

from broker_worker.protocol.errors import JobError
from broker_worker.protocol.images import ImageLimits, LruCache, content_key, decode_image, strip_data_url
from tests.helpers import png_b64


def png_bomb(width: int = 40000, height: int = 40000) -> str:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    raw = zlib.compress(b"\0" * ((width + 7) // 8 + 1) * 64)
    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
        + chunk(b"IDAT", raw)
        + chunk(b"IEND", b"")
    )
    return base64.b64encode(png).decode()


def test_decodes_png_and_data_url() -> None:
    b64 = png_b64(64, 32)
    assert decode_image(b64).size == (64, 32)
    assert decode_image("data:image/png;base64," + b64).size == (64, 32)
    assert strip_data_url("data:image/jpeg;base64,QUJD") == "QUJD"


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ("this is not base64 !!!", "invalid base64"),
        (png_b64(64, 64)[:-20] + "@@", "invalid base64"),
        (base64.b64encode(b"not an image at all").decode(), "not a readable image"),
        (png_b64(64, 64)[: len(png_b64(64, 64)) // 2 // 4 * 4], "not a readable image"),
    ],
)
def test_bad_images_are_typed_errors(payload: str, fragment: str) -> None:
    with pytest.raises(JobError) as err:
        decode_image(payload, 2)
    assert err.value.code == 40001
    assert fragment in err.value.message
    assert err.value.message.startswith("image 2:")


def test_decompression_bomb_refused_without_decoding() -> None:
    with pytest.raises(JobError) as err:
        decode_image(png_bomb())  # 1.6 G pixels announced in a few hundred bytes: only the header was read
    assert err.value.code == 40001
    assert err.value.message == (
        "image 1: refused as a decompression bomb (Image size (1600000000 pixels) exceeds limit of 178956970 "
        "pixels, could be decompression bomb DOS attack.)"
    )  # how fast: bench/refusals.py


@pytest.mark.parametrize(
    ("width", "height"),
    [(7072, 7071), (20_001, 10)],  # 50,006,112 pixels > 50 M; one side > 20,000
)
def test_default_pixel_limits(width: int, height: int) -> None:
    with pytest.raises(JobError) as err:
        decode_image(png_bomb(width, height))
    assert err.value.message == f"image 1: {width}x{height} pixels is over the limit (50000000 pixels, 20000 per side)"


def test_decoded_size_limit_is_20_mib() -> None:
    limit = 20 * 1024 * 1024
    just_over = base64.b64encode(b"\0" * (limit + 3)).decode()  # base64 of 20 MiB + 3 bytes
    with pytest.raises(JobError) as err:
        decode_image(just_over)
    assert err.value.message == f"image 1: {len(just_over)} base64 characters; the limit is {limit} bytes decoded"
    with pytest.raises(JobError, match="not a readable image"):  # at the limit: decoded, then found not an image
        decode_image(base64.b64encode(b"\0" * limit).decode())


def test_pixel_and_byte_limits() -> None:
    with pytest.raises(JobError, match="over the limit"):
        decode_image(png_b64(200, 200), limits=ImageLimits(max_pixels=10_000))
    with pytest.raises(JobError, match="limit is 100 bytes"):
        decode_image(png_b64(200, 200), limits=ImageLimits(max_bytes=100))


def test_lru_cache_hits_and_evicts_by_size() -> None:
    cache: LruCache[bytes] = LruCache(10, len)
    made = []

    def make(value: bytes) -> bytes:
        made.append(value)
        return value

    assert cache.get_or_make("a", lambda: make(b"aaaa")) == b"aaaa"
    assert cache.get_or_make("a", lambda: make(b"xxxx")) == b"aaaa"
    cache.get_or_make("b", lambda: make(b"bbbb"))
    cache.get_or_make("c", lambda: make(b"cccc"))  # evicts "a"
    cache.get_or_make("a", lambda: make(b"aaaa"))
    assert made == [b"aaaa", b"bbbb", b"cccc", b"aaaa"]
    assert (cache.hits, cache.misses) == (1, 4)


def test_content_key_ignores_data_url_prefix() -> None:
    b64 = png_b64(8, 8)
    assert content_key(b64) == content_key("data:image/png;base64," + b64)


def test_image_modes_open() -> None:
    for mode in ("RGBA", "L", "P", "CMYK"):
        buf = io.BytesIO()
        Image.new(mode, (10, 10)).save(buf, format="TIFF" if mode == "CMYK" else "PNG")
        assert decode_image(base64.b64encode(buf.getvalue()).decode()).mode == mode
