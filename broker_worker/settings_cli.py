"""Command-line flags generated from a settings model, so flags, env vars and .env always agree."""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)


def add_arguments(parser: argparse.ArgumentParser, model: type[BaseSettings]) -> None:
    for name, info in model.model_fields.items():
        flag = "--" + name.replace("_", "-")
        help_text = f"{info.description or ''} (env {_env_name(model, name)})".strip()
        annotation = _unwrap(info.annotation)
        if annotation is bool:
            parser.add_argument(flag, action="store_const", const=True, default=None, help=help_text)
        elif typing.get_origin(annotation) is typing.Literal:
            parser.add_argument(flag, choices=typing.get_args(annotation), default=None, help=help_text)
        else:
            kind = annotation if annotation in (int, float, str, Path) else str
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def build(model: type[S], args: argparse.Namespace) -> S:
    """Flags given on the command line win over the environment and .env."""
    given = {k: v for k, v in vars(args).items() if v is not None and k in model.model_fields}
    return model(**given)


def _env_name(model: type[BaseSettings], name: str) -> str:
    if name == "redis_url":
        return "REDIS_URL"
    prefix = model.model_config.get("env_prefix", "") or ""
    return f"{prefix}{name}".upper()


def _unwrap(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else str
    return annotation
