"""Passwords out of what is logged or shown: Redis URLs (``user:password@``, secret query parameters) and every
URL inside a log line. Used wherever a URL reaches a log, an error message or a page."""

from __future__ import annotations

import re
from urllib.parse import unquote


def redact(url: str) -> str:
    """The URL with every password in it masked, for logs: ``user:password@`` (one host or a Sentinel list, even
    with an unencoded ``@`` in the password) and secret query parameters (``?password=``, ``sentinel_password=``,
    tokens). Never raises: it parses nothing that can be malformed."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    query_at = min((i for i in (rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    base, tail = rest[:query_at], rest[query_at:]
    credentials, at, hosts = base.rpartition("@")  # the last @ before the query ends the userinfo
    if at and ":" in credentials:
        base = f"{credentials.split(':', 1)[0]}:***@{hosts}"
    return f"{scheme}://{base}{_QUERY_PARAM.sub(_mask_param, tail)}"


_SECRET_NAME = re.compile(r"pass|pwd|secret|token|auth|credential|key", re.IGNORECASE)
_QUERY_PARAM = re.compile(r"(?<=[?&;])([^=&;#]*)=([^&;#]*)")
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]+")


def _mask_param(match: re.Match[str]) -> str:
    name = match.group(1)
    return f"{name}=***" if _SECRET_NAME.search(unquote(name)) else match.group(0)


def redact_text(text: str) -> str:
    """Every URL in a log line (message or traceback) redacted; trailing punctuation is kept outside it."""

    def one(match: re.Match[str]) -> str:
        url = match.group(0)
        core = url.rstrip(".,;:)]}")
        return redact(core) + url[len(core) :]

    return _URL_IN_TEXT.sub(one, text) if "://" in text else text
