"""Errors raised by the twin.

TwinError
 ├── SpecError          a GPU or model description is wrong or incomplete (names the field)
 ├── ConfigurationError an engine configuration that cannot work (e.g. weights do not fit)
 ├── RequestError       the twin engine refused a request at enqueue (names the bad field)
 ├── ExecutorShutdownError  the twin engine was used after shutdown()
 ├── KvCacheExhaustedError  a KV block allocation the pool cannot serve (a scheduler bug)
 └── TwinNvmlError      the twin GPU refused a call, with the NVML return code a real GPU gives
"""

from __future__ import annotations


class TwinError(Exception):
    """Base of every error the twin raises."""


class SpecError(TwinError, ValueError):
    """A GPU or model description is wrong or incomplete."""


class ConfigurationError(TwinError, ValueError):
    """An engine configuration that cannot work on the chosen hardware."""


class RequestError(TwinError, ValueError):
    """An executor request the engine cannot run (empty prompt, too long, max_tokens <= 0...)."""


class ExecutorShutdownError(TwinError, RuntimeError):
    """The twin engine was asked to take work after shutdown()."""


class KvCacheExhaustedError(TwinError, RuntimeError):
    """A KV-cache allocation the pool cannot serve: a scheduler bug, never a user error."""


# NVML return codes (nvml.h) the twin reproduces, so drivers can map both the same way.
NVML_ERROR_INVALID_ARGUMENT = 2
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_NO_PERMISSION = 4


class TwinNvmlError(TwinError):
    """A twin GPU call failed the way the NVML call would, with NVML's return code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
