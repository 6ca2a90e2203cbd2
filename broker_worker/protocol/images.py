"""Base64 images in, PIL images out, with limits: a bad or hostile image is a typed error, never a crash.

Also a content-hash cache of tiled images: chat clients (InternVL's app included) resend every earlier image
with each turn, so the same bytes are decoded and tiled again and again without it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from PIL import Image, UnidentifiedImageError

from broker_worker.protocol.errors import invalid

_DATA_URL_MARK = ";base64,"


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 20 * 1024 * 1024
    max_pixels: int = 50_000_000  # ~7000 x 7000; above this PIL would allocate gigabytes
    max_side: int = 20_000


DEFAULT_LIMITS = ImageLimits()


def strip_data_url(b64: str) -> str:
    """Accept both bare base64 and ``data:image/png;base64,...`` (OpenAI clients send the latter)."""
    if b64.startswith("data:") and _DATA_URL_MARK in b64[:100]:
        return b64.split(_DATA_URL_MARK, 1)[1]
    return b64


def decode_base64(b64: str, index: int, limits: ImageLimits = DEFAULT_LIMITS) -> bytes:
    text = strip_data_url(b64)
    if len(text) > limits.max_bytes * 4 // 3 + 4:
        raise invalid(f"image {index}: {len(text)} base64 characters; the limit is {limits.max_bytes} bytes decoded")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise invalid(f"image {index}: invalid base64 ({exc})") from exc


def open_image(data: bytes, index: int, limits: ImageLimits = DEFAULT_LIMITS, *, load: bool = True) -> Image.Image:
    """Open an image after checking its header's size against the limits, then decode it. With ``load=False``
    only the header is read (nothing is decompressed): the gateway's check before a job is queued."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_size(image.size, index, limits)
            if load:
                image.load()
    except Image.DecompressionBombError as exc:
        raise invalid(f"image {index}: refused as a decompression bomb ({exc})") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as exc:
        raise invalid(f"image {index}: not a readable image ({type(exc).__name__}: {exc})") from exc
    return image


def _check_size(size: tuple[int, int], index: int, limits: ImageLimits) -> None:
    width, height = size
    if width < 1 or height < 1 or max(width, height) > limits.max_side or width * height > limits.max_pixels:
        raise invalid(
            f"image {index}: {width}x{height} pixels is over the limit "
            f"({limits.max_pixels} pixels, {limits.max_side} per side)"
        )


def decode_image(b64: str, index: int = 1, limits: ImageLimits = DEFAULT_LIMITS) -> Image.Image:
    return open_image(decode_base64(b64, index, limits), index, limits)


def content_key(b64: str) -> str:
    return hashlib.sha256(strip_data_url(b64).encode()).hexdigest()  # SHA-NI makes it the fastest here


V = TypeVar("V")


class LruCache(Generic[V]):
    """A thread-safe LRU bounded by the summed ``size_of`` of its values (bytes)."""

    def __init__(self, max_bytes: int, size_of: Callable[[V], int]) -> None:
        self._max_bytes = max_bytes
        self._size_of = size_of
        self._items: OrderedDict[object, V] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get_or_make(self, key: object, make: Callable[[], V]) -> V:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                self.hits += 1
                return self._items[key]
            self.misses += 1
        value = make()  # outside the lock: tiling takes milliseconds
        self._put(key, value)
        return value

    def _put(self, key: object, value: V) -> None:
        size = self._size_of(value)
        if size > self._max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += size
            while self._bytes > self._max_bytes:
                _, old = self._items.popitem(last=False)
                self._bytes -= self._size_of(old)

    def __len__(self) -> int:
        return len(self._items)
