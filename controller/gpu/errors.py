"""The clock drivers' own exceptions, and the one place vendor errors are translated into them.

GpuError                  any failed GPU call (`code`: the NVML return code, if any)
 ├── LibraryNotFound      NVML or the GPU driver is missing or unusable (codes 9, 12, 13, 18)
 ├── NoPermission         changing clocks needs root or CAP_SYS_ADMIN, or the clock daemon (4)
 ├── NotSupported         this GPU does not offer the call (3)
 ├── InvalidArgument      a bad GPU index or clock (2)
 ├── GpuLost              the GPU fell off the bus or needs a reset (15, 16)
 └── ClockdError          talking to the clock daemon (`throttllem clockd`) failed
      ├── DaemonUnavailable   not running, socket missing, or the connection broke
      ├── LeaseConflict       another client holds the lease on that GPU
      └── LeaseLost           no lease to renew: it lapsed (clocks were reset) or never was

Callers catch the branch they can act on (NoPermission: observe only; GpuLost: stop actuating),
never pynvml's classes: the twin, the clock daemon and a remote twin raise the same tree.
`kind` names each class on the clock daemon's wire (see `error_for_kind`).
"""

from __future__ import annotations

import pynvml

from throttllem.backend.twin.errors import TwinNvmlError

# Codes that mean "no usable NVML here" rather than a problem with one call.
_LIBRARY_CODES = frozenset(
    {
        pynvml.NVML_ERROR_DRIVER_NOT_LOADED,
        pynvml.NVML_ERROR_LIBRARY_NOT_FOUND,
        pynvml.NVML_ERROR_FUNCTION_NOT_FOUND,
        pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH,
    }
)
_LOST_CODES = frozenset({pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_RESET_REQUIRED})


class GpuError(Exception):
    """A GPU call failed. `code` is NVML's return code when the failure came from NVML (or the
    twin, which reproduces NVML's codes), else None."""

    kind = "gpu_error"

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class LibraryNotFound(GpuError):
    kind = "library_not_found"


class NoPermission(GpuError):
    kind = "no_permission"


class NotSupported(GpuError):
    kind = "not_supported"


class InvalidArgument(GpuError):
    kind = "invalid_argument"


class GpuLost(GpuError):
    kind = "gpu_lost"


class ClockdError(GpuError):
    kind = "clockd_error"


class DaemonUnavailable(ClockdError):
    kind = "daemon_unavailable"


class LeaseConflict(ClockdError):
    kind = "lease_conflict"


class LeaseLost(ClockdError):
    kind = "lease_lost"


_BY_CODE: dict[int, type[GpuError]] = {
    pynvml.NVML_ERROR_NO_PERMISSION: NoPermission,
    pynvml.NVML_ERROR_NOT_SUPPORTED: NotSupported,
    pynvml.NVML_ERROR_INVALID_ARGUMENT: InvalidArgument,
    **dict.fromkeys(_LIBRARY_CODES, LibraryNotFound),
    **dict.fromkeys(_LOST_CODES, GpuLost),
}

_BY_KIND: dict[str, type[GpuError]] = {
    cls.kind: cls
    for cls in (
        GpuError,
        LibraryNotFound,
        NoPermission,
        NotSupported,
        InvalidArgument,
        GpuLost,
        ClockdError,
        DaemonUnavailable,
        LeaseConflict,
        LeaseLost,
    )
}


def translate(error: Exception, context: str = "") -> GpuError:
    """Our exception for a vendor one: pynvml.NVMLError or the twin's TwinNvmlError.

    Use as `raise translate(e, "GPU 0: set locked clocks") from e`, so the NVML error stays
    attached as the cause. Anything else becomes a plain GpuError (no code).
    """
    code: int | None
    if isinstance(error, pynvml.NVMLError):
        code = int(error.value)
        text = str(error)
    elif isinstance(error, TwinNvmlError):
        code = error.code
        text = str(error)
    else:
        code, text = None, f"{type(error).__name__}: {error}"
    cls = _BY_CODE.get(code, GpuError) if code is not None else GpuError
    message = f"{context}: {text}" if context else text
    if code is not None:
        message += f" (NVML code {code})"
    return cls(message, code)


def error_for_kind(kind: str, message: str, code: int | None = None) -> GpuError:
    """Rebuild an error the clock daemon sent by its `kind` (unknown kinds: plain GpuError)."""
    return _BY_KIND.get(kind, GpuError)(message, code)
