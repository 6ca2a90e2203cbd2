"""The protocol's Lua scripts (``lua/*.lua``): their text, and calls of them in one pipeline, sent by their hash."""

from __future__ import annotations

import functools
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError

ScriptCall = tuple[AsyncScript, list[Any], list[Any]]


#: A script's first line naming the fragment it needs (lua/record_event.lua), put before its own text.
_WITH = "-- with: "


@functools.cache
def lua(name: str) -> str:
    text = resources.files("broker_worker.protocol").joinpath(f"lua/{name}.lua").read_text()
    first = text.split("\n", 1)[0]
    return lua(first.removeprefix(_WITH).strip()) + text if first.startswith(_WITH) else text


async def evalsha_pipeline(redis: aioredis.Redis, calls: list[ScriptCall]) -> list[Any]:
    """Each call's result or error, in order, in one round trip. redis-py's own script pipelines ask Redis whether
    it knows the scripts first (SCRIPT EXISTS: one round trip more per pipeline); here a script Redis does not
    know (a restart, SCRIPT FLUSH) is loaded and its calls are sent again."""
    results = await _pipeline(redis, calls)
    missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
    if missing:
        for script in {id(calls[i][0]): calls[i][0] for i in missing}.values():
            script.sha = await redis.script_load(script.script)
        again = await _pipeline(redis, [calls[i] for i in missing])
        for i, result in zip(missing, again, strict=True):
            results[i] = result
    return results


async def _pipeline(redis: aioredis.Redis, calls: list[ScriptCall]) -> list[Any]:
    async with redis.pipeline(transaction=False) as pipe:
        for script, keys, args in calls:
            pipe.evalsha(script.sha, len(keys), *keys, *args)
        return list(await pipe.execute(raise_on_error=False))
