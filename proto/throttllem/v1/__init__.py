"""The gRPC contract between throttllem's Triton backend and its controller (package throttllem.v1).

`telemetry.proto` is the source; `telemetry_pb2*.py(i)` beside it are generated from it by
`python -m throttllem.backend.telemetry.codegen` and committed (a test fails when they are stale).
"""

PROTOCOL = "throttllem.v1"
