"""`make bench`: every benchmark, each printing its figures and its ratio to a baseline measured
in the same run. Each runs in its own process, so one's CPU pinning or servers never touch the
next."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = ["bench_twin", "bench_decision", "bench_serving"]


def main() -> int:
    here = Path(__file__).resolve().parent
    failed = []
    for name in BENCHMARKS:
        path = here / f"{name}.py"
        if not path.exists():
            print(f"== {name}: not present, skipped\n")
            continue
        print(f"== {name}", flush=True)
        if subprocess.run([sys.executable, str(path)], check=False).returncode != 0:
            failed.append(name)
        print(flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
