"""config.pbtxt parameters, read the way tensorrtllm_backend reads them.

Every parameter arrives as a string. An empty string and an unfilled `${...}` template placeholder
both mean "unset" (the reference model's rule), so one config.pbtxt serves as a template and as a
filled-in file. A value that is set but cannot be read is an error naming the parameter (the
reference model logs a warning and silently uses its default; a wrong deployment should fail to
load instead).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class ParameterError(ValueError):
    """A config.pbtxt parameter with a value that cannot be used."""


def is_unset(value: str | None) -> bool:
    if value is None:
        return True
    v = value.strip()
    return v == "" or (v.startswith("${") and v.endswith("}"))


class Parameters:
    """The set parameters of one model config, with typed getters."""

    def __init__(self, raw: Mapping[str, str]) -> None:
        self._values = {k: v.strip() for k, v in raw.items() if not is_unset(v)}

    @classmethod
    def from_model_config(cls, model_config: Mapping[str, Any]) -> Parameters:
        """From Triton's model config (the JSON `args['model_config']` holds)."""
        params = model_config.get("parameters") or {}
        raw: dict[str, str] = {}
        for name, value in params.items():
            if isinstance(value, Mapping):
                raw[name] = str(value.get("string_value", ""))
            else:
                raw[name] = str(value)
        return cls(raw)

    @classmethod
    def from_json(cls, model_config_json: str) -> Parameters:
        return cls.from_model_config(json.loads(model_config_json))

    def names(self) -> list[str]:
        return sorted(self._values)

    def __contains__(self, name: object) -> bool:
        return name in self._values

    def as_dict(self) -> dict[str, str]:
        return dict(self._values)

    def get_str(self, name: str, default: str | None = None) -> str | None:
        return self._values.get(name, default)

    def require_str(self, name: str) -> str:
        value = self._values.get(name)
        if value is None:
            raise ParameterError(f"parameter '{name}' is required")
        return value

    def get_int(
        self, name: str, default: int | None = None, *, minimum: int | None = None
    ) -> int | None:
        value = self._values.get(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            raise ParameterError(
                f"parameter '{name}': expected an integer, got {value!r}"
            ) from None
        if minimum is not None and number < minimum:
            raise ParameterError(f"parameter '{name}': must be >= {minimum}, got {number}")
        return number

    def get_float(
        self, name: str, default: float | None = None, *, minimum: float | None = None
    ) -> float | None:
        value = self._values.get(name)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise ParameterError(f"parameter '{name}': expected a number, got {value!r}") from None
        if number != number or number in (float("inf"), float("-inf")):
            raise ParameterError(f"parameter '{name}': expected a finite number, got {value!r}")
        if minimum is not None and number < minimum:
            raise ParameterError(f"parameter '{name}': must be >= {minimum}, got {number}")
        return number

    def get_bool(self, name: str, default: bool | None = None) -> bool | None:
        value = self._values.get(name)
        if value is None:
            return default
        low = value.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ParameterError(f"parameter '{name}': expected true or false, got {value!r}")

    def get_int_list(self, name: str) -> list[int] | None:
        value = self._values.get(name)
        if value is None:
            return None
        try:
            return [int(x) for x in value.split(",") if x.strip()]
        except ValueError:
            raise ParameterError(
                f"parameter '{name}': expected comma-separated integers, got {value!r}"
            ) from None
