"""Search over a knob space with an XGBoost cost model (the AutoTVM recipe).

Measure the default and a random batch; then, each round, fit gradient-boosted trees on
(knob features -> log time) of everything measured so far, rank every unmeasured setting by
the model, and measure the best-predicted ones (plus a few random ones, so the model sees
outside its own favourites). A setting that fails to build or run costs +inf and is kept
out of the fit. Pure over `measure`: the caller owns compiling and timing.
"""
from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from tqdm import tqdm


@dataclass
class Trial:
    config: dict
    cost: float              # seconds (inf: failed)
    error: str = ""


@dataclass
class TuneResult:
    best: dict
    best_cost: float
    default_cost: float
    trials: list[Trial] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def speedup(self) -> float:
        return self.default_cost / self.best_cost if self.best_cost > 0 else float("nan")


def configs(space: dict[str, tuple], keep: Callable[[dict], bool] = lambda c: True) -> list[dict]:
    names = list(space)
    out = [dict(zip(names, vals)) for vals in itertools.product(*(space[n] for n in names))]
    return [c for c in out if keep(c)]


def features(space: dict[str, tuple], cfgs: list[dict]) -> np.ndarray:
    """log2 of numeric knobs, one-hot of the others: trees split on both."""
    cols = []
    for name, choices in space.items():
        vals = [c[name] for c in cfgs]
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in choices):
            cols.append(np.log2(np.asarray(vals, dtype=np.float64)))
        else:
            for ch in choices:
                cols.append(np.asarray([v == ch for v in vals], dtype=np.float64))
    return np.stack(cols, axis=1)


def tune(space: dict[str, tuple], measure: Callable[[dict], float], trials: int, default: dict,
         keep: Callable[[dict], bool] = lambda c: True, batch: int = 8, explore: float = 0.2,
         seed: int = 0, desc: str = "tune") -> TuneResult:
    """Up to `trials` measurements (the default's included); returns the cheapest found."""
    import xgboost as xgb

    rng = np.random.default_rng(seed)
    cand = configs(space, keep)
    if not cand:
        raise ValueError("the knob space has no valid setting")
    feats = features(space, cand)
    index = {tuple(sorted(c.items())): i for i, c in enumerate(cand)}
    measured: dict[int, Trial] = {}
    t0 = time.perf_counter()
    bar = tqdm(total=min(trials, len(cand)), desc=desc, unit="trial")

    def run(i: int) -> None:
        try:
            cost = float(measure(cand[i]))
            err = ""
        except Exception as e:     # a setting that does not build is a result, not a crash
            cost, err = math.inf, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        measured[i] = Trial(cand[i], cost, err)
        bar.update(1)
        best = min(t.cost for t in measured.values())
        bar.set_postfix(best_us=f"{best * 1e6:.1f}")

    d_key = tuple(sorted(default.items()))
    if d_key not in index:
        raise ValueError(f"default setting {default} is not in the knob space")
    budget = min(trials, len(cand))
    run(index[d_key])
    for i in rng.permutation(len(cand))[:max(0, min(batch, budget - 1))]:
        if i not in measured:
            run(int(i))
    while len(measured) < budget:
        ok = [i for i, t in measured.items() if math.isfinite(t.cost)]
        left = np.array([i for i in range(len(cand)) if i not in measured])
        n_next = min(batch, budget - len(measured), len(left))
        if len(ok) >= 4:
            params = {"max_depth": 4, "eta": 0.2, "subsample": 0.9, "seed": seed, "nthread": 1,
                      "objective": "reg:squarederror"}
            model = xgb.train(params, xgb.DMatrix(feats[ok], label=np.log(
                [measured[i].cost for i in ok])), num_boost_round=100)
            order = left[np.argsort(model.predict(xgb.DMatrix(feats[left])), kind="stable")]
        else:
            order = rng.permutation(left)
        n_rand = int(round(explore * n_next))
        pick = list(order[:n_next - n_rand])
        rest = [i for i in left if i not in set(pick)]
        pick += list(rng.choice(rest, size=min(n_rand, len(rest)), replace=False)) if rest else []
        for i in pick:
            run(int(i))
    bar.close()
    best_i = min(measured, key=lambda i: measured[i].cost)
    return TuneResult(best=cand[best_i], best_cost=measured[best_i].cost,
                      default_cost=measured[index[d_key]].cost,
                      trials=list(measured.values()), seconds=time.perf_counter() - t0)
