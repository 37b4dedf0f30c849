"""The clock daemon's wire format: one JSON object per line over a Unix stream socket.

Requests carry `op` ("hello", "set", "renew", "reset", "read", "status") and its fields; every
reply has `ok`. A failed request gets `{"ok": false, "error": KIND, "message": ..., "code": ...}`
where KIND names a class of the error tree (errors.py), so the client re-raises the same class.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import GpuError, InvalidArgument, error_for_kind

PROTOCOL_VERSION = 1
# Requests are a few hundred bytes; anything this long is not a client of ours.
MAX_LINE_BYTES = 64 * 1024

Message = dict[str, Any]


def encode(message: Message) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> Message:
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidArgument(f"not a JSON line: {e}") from e
    if not isinstance(message, dict):
        raise InvalidArgument("a message must be a JSON object")
    return message


def error_reply(error: GpuError) -> Message:
    return {"ok": False, "error": error.kind, "message": str(error), "code": error.code}


def raise_for_error(reply: Message) -> Message:
    """The reply itself when it succeeded; else the error it carries, as our exception."""
    if reply.get("ok") is True:
        return reply
    code = reply.get("code")
    raise error_for_kind(
        str(reply.get("error", "gpu_error")),
        str(reply.get("message", "clock daemon refused the request")),
        code if isinstance(code, int) else None,
    )


def field_int(message: Message, name: str) -> int:
    value = message.get(name)
    # bool is an int to Python, never a clock or an index.
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidArgument(f"field {name!r} must be a whole number, got {value!r}")
    return value


def field_seconds(message: Message, name: str) -> float:
    value = message.get(name)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise InvalidArgument(f"field {name!r} must be a number of seconds, got {value!r}")
    return float(value)


def field_gpus(message: Message, name: str = "gpus") -> tuple[int, ...]:
    value = message.get(name)
    if not isinstance(value, list) or not value:
        raise InvalidArgument(f"field {name!r} must be a non-empty list of GPU indices")
    return tuple(field_int({name: v}, name) for v in value)
