"""GPU clock control: one `ClockDriver` interface (driver.py), one module per backend (NVML,
the twin, the clock daemon's client), the error tree (errors.py) and the fail-safe clock daemon
(clockd.py). See docs/clock-control.md.

Import from the submodules: this package imports nothing itself, so the privileged daemon does
not load the twin and a metrics exporter does not load the daemon.
"""
