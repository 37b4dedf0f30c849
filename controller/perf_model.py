"""The performance model: engine iterations per second (IPS) from the work in flight and the clock.

Inputs are the paper's (TP size, batch size, KV blocks in use, SM clock) plus the prompt tokens
processed in the iteration, which the paper leaves out but which dominate an iteration with a
prefill in it. The model sits behind a small Protocol; CatBoost is the one implementation.

The CatBoost model learns log(IPS): errors become relative, which is what the clock choice needs
(a 3% error matters as much at 10 IPS as at 100). It is NOT given CatBoost's monotone
constraints: on twin profiles they doubled the error (MAPE 3.1% vs 1.8%). The compiled table
(ips_table.py) makes the clock axis monotone instead, which is all the clock search needs.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

log = logging.getLogger(__name__)

FEATURES = ("sm_clock_mhz", "batch_size", "kv_blocks", "ctx_tokens", "tp")
TARGET = "ips"
POWER = "power_w"  # mean engine power during the iteration (all GPUs), when profiled

FloatArray = npt.NDArray[np.float64]


@runtime_checkable
class PowerPredictor(Protocol):
    """A performance model that also knows power: lets the policy avoid clocks so low that the
    run takes longer than it saves (below the energy-optimal clock, static power dominates)."""

    def has_power(self) -> bool: ...

    def predict_power_w(self, features: FloatArray) -> FloatArray: ...


class PerformanceModel(Protocol):
    def predict_ips(self, features: FloatArray) -> FloatArray:
        """IPS for each row of `features` (columns in FEATURES order)."""
        ...


@dataclass(frozen=True)
class ModelReport:
    r2: float
    mae_ips: float
    mape: float  # fraction, e.g. 0.03 = 3%
    n_train: int
    n_test: int

    def to_json(self) -> dict[str, float | int]:
        return asdict(self)


def read_dataset(
    paths: Sequence[Path | str],
) -> tuple[FloatArray, FloatArray, FloatArray | None]:
    """Rows of FEATURES, IPS and (when every file has it) power from profiling CSV files."""
    xs, ys, ps = [], [], []
    for path in paths:
        path = Path(path)
        try:
            with path.open() as f:
                lines = [line for line in f if line.strip() and not line.startswith("#")]
        except OSError as e:
            raise ValueError(f"{path}: not a readable profiling dataset ({e.strerror})") from e
        if not lines:
            raise ValueError(f"{path}: empty: no header and no rows")
        header = lines[0].strip().split(",")
        missing = [c for c in (*FEATURES, TARGET) if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}")
        if len(lines) == 1:
            raise ValueError(f"{path}: no rows")
        try:
            data = np.loadtxt(lines[1:], delimiter=",", ndmin=2)
        except ValueError as e:
            raise ValueError(f"{path}: malformed row ({e})") from e
        xs.append(data[:, [header.index(c) for c in FEATURES]])
        ys.append(data[:, header.index(TARGET)])
        ps.append(data[:, header.index(POWER)] if POWER in header else None)
    power: FloatArray | None = None
    if all(p is not None for p in ps):
        power = np.concatenate([p for p in ps if p is not None])
    return np.vstack(xs), np.concatenate(ys), power


def write_dataset(
    path: Path,
    x: FloatArray,
    ips: FloatArray,
    meta: dict[str, str],
    power_w: FloatArray | None = None,
) -> None:
    """A CSV with `# key=value` metadata lines, a header, and one row per iteration."""
    columns = [x, ips] if power_w is None else [x, ips, power_w]
    names = (*FEATURES, TARGET) if power_w is None else (*FEATURES, TARGET, POWER)
    with path.open("w") as f:
        for key, value in meta.items():
            f.write(f"# {key}={value}\n")
        f.write(",".join(names) + "\n")
        np.savetxt(f, np.column_stack(columns), delimiter=",", fmt="%.6g")


def evaluate(model: PerformanceModel, x: FloatArray, y: FloatArray, n_train: int) -> ModelReport:
    pred = model.predict_ips(x)
    residual = y - pred
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residual**2).sum()) / ss_tot if ss_tot > 0 else 0.0
    return ModelReport(
        r2=r2,
        mae_ips=float(np.abs(residual).mean()),
        mape=float((np.abs(residual) / y).mean()),
        n_train=n_train,
        n_test=int(y.shape[0]),
    )


class CatBoostPerformanceModel:
    """Gradient-boosted trees over log(IPS); save/load as CatBoost's .cbm plus a JSON sidecar."""

    def __init__(
        self,
        booster: object,
        meta: dict[str, object] | None = None,
        power_booster: object | None = None,
    ) -> None:
        self._booster = booster
        self._power = power_booster
        self.meta = meta or {}

    @staticmethod
    def _fit_one(
        x: FloatArray, y: FloatArray, iterations: int, depth: int, seed: int, threads: int
    ) -> object:
        from catboost import CatBoostRegressor

        booster = CatBoostRegressor(
            iterations=iterations,
            depth=depth,
            learning_rate=0.08,
            loss_function="RMSE",
            random_seed=seed,
            thread_count=threads,
            verbose=False,
            allow_writing_files=False,
        )
        booster.fit(x, np.log(y))
        return booster

    @classmethod
    def fit(
        cls,
        x: FloatArray,
        ips: FloatArray,
        *,
        power_w: FloatArray | None = None,
        iterations: int = 800,
        depth: int = 8,
        seed: int = 0,
        threads: int = -1,
    ) -> CatBoostPerformanceModel:
        """IPS model, and a power model (same features, log watts) when power was profiled."""
        if np.any(ips <= 0):
            raise ValueError("IPS must be positive in every row")
        booster = cls._fit_one(x, ips, iterations, depth, seed, threads)
        power = None
        if power_w is not None:
            if np.any(power_w <= 0):
                raise ValueError("power must be positive in every row")
            power = cls._fit_one(x, power_w, iterations // 2, depth, seed, threads)
        meta = {"features": list(FEATURES), "target": "log_ips", "power": power is not None}
        return cls(booster, meta, power)

    def predict_ips(self, features: FloatArray) -> FloatArray:
        raw = self._booster.predict(np.asarray(features, dtype=np.float64))  # type: ignore[attr-defined]
        return np.exp(np.asarray(raw, dtype=np.float64))

    def has_power(self) -> bool:
        return self._power is not None

    def predict_power_w(self, features: FloatArray) -> FloatArray:
        if self._power is None:
            raise ValueError("this model was trained without power measurements")
        raw = self._power.predict(np.asarray(features, dtype=np.float64))  # type: ignore[attr-defined]
        return np.exp(np.asarray(raw, dtype=np.float64))

    def save(self, path: Path) -> None:
        self._booster.save_model(str(path), format="cbm")  # type: ignore[attr-defined]
        if self._power is not None:
            self._power.save_model(f"{path}.power.cbm", format="cbm")  # type: ignore[attr-defined]
        Path(f"{path}.json").write_text(json.dumps(self.meta, indent=2))

    @classmethod
    def load(cls, path: Path | str) -> CatBoostPerformanceModel:
        from catboost import CatBoostRegressor

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"performance model {path} does not exist")
        booster = CatBoostRegressor()
        booster.load_model(str(path), format="cbm")
        sidecar = Path(f"{path}.json")
        meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        power = None
        if Path(f"{path}.power.cbm").is_file():
            power = CatBoostRegressor()
            power.load_model(f"{path}.power.cbm", format="cbm")
        return cls(booster, meta, power)


def split_indices(
    n: int, test_fraction: float, seed: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(train, test) row indices: a seeded random hold-out."""
    order = np.random.default_rng(seed).permutation(n)
    n_test = max(1, round(n * test_fraction))
    return order[n_test:], order[:n_test]


def plot_predicted_vs_measured(y: FloatArray, pred: FloatArray, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(y, pred, s=3, alpha=0.4)
    lo, hi = float(min(y.min(), pred.min())), float(max(y.max(), pred.max()))
    ax.plot([lo, hi], [lo, hi], color="black", linewidth=1)
    ax.set_xlabel("measured IPS")
    ax.set_ylabel("predicted IPS")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
