"""dp_linear_regression: least squares trained with differential privacy, by sufficient
statistics perturbation: the sums of z z' over the rows (z = the clamped features, 1 and the
clamped label) get one draw of OpenDP's Laplace noise, and the model is solved from the noised
sums (post-processing, free). epsilon-DP per identity, see ``dp``.

Parameters (strings on the wire): ``label``; ``features`` (required: each needs bounds);
``feature_bounds``: ``lo:hi`` per feature, in order (or one for all); ``label_lower`` and
``label_upper``; ``alpha`` (ridge, default 1, on the coefficients, steadies the solve of
noised sums); and ``epsilon``, ``identity``, ``max_contributions``.

Rows with a null or non-finite feature or label are left out; nothing in the data can make it
fail or choose what it reports. No metrics on the rows are reported (they would not be DP):
score the model on data of your own.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from teeflow.compute import dp
from teeflow.compute.columns import columns_of, is_numeric
from teeflow.compute.params import Param, make_check_params
from teeflow.core.errors import ParameterError, SchemaMismatch

NAME = "dp_linear_regression"
DESCRIPTION = (
    "Linear regression trained with differential privacy (OpenDP Laplace noise on the "
    "clamped sufficient statistics), with contribution bounds per identity; the result "
    "carries the epsilon spent"
)
LAYOUT = "rows"
MIN_DATASETS = 1
USES = ("teeflow.compute.dp", "teeflow.compute.columns", "teeflow.compute.params")
MAX_FEATURES = 20


def _bounds_ok(items: list[str]) -> str | None:
    for item in items:
        lo, sep, hi = item.partition(":")
        try:
            low, high = float(lo), float(hi)
        except ValueError:
            return f"expected lo:hi pairs, got {item!r}"
        if not sep or not (np.isfinite(low) and np.isfinite(high)) or not low < high:
            return f"expected lo:hi with lo < hi, got {item!r}"
        if max(abs(low), abs(high)) > 1e6:
            return "bounds beyond ±1e6"
    return None


PARAMS = (
    Param("label", "str", required=True, help="the numeric label column"),
    Param("features", "list[str]", required=True, help="comma-separated feature columns"),
    Param("feature_bounds", "list[str]", required=True, check=_bounds_ok,
          help="lo:hi clamp bounds per feature, in order (or one pair for all)"),
    Param("label_lower", "float", required=True, low=-1e6, high=1e6,
          help="the label is clamped to [label_lower, label_upper]"),
    Param("label_upper", "float", required=True, low=-1e6, high=1e6,
          help="the label is clamped to [label_lower, label_upper]"),
    Param("alpha", "float", default=1.0, low=0.0, high=1e9,
          help="ridge penalty on the coefficients, added to the noised X'X"),
    *dp.PRIVACY_PARAMS,
)


# What the release spends and protects: the unit of privacy, its bounds, the columns.
REVEALING = ("epsilon", "identity", "max_contributions", "label", "features",
             "feature_bounds", "label_lower", "label_upper")


def _cross_check(p: dict[str, Any]) -> None:
    feats = p["features"]
    if p["label"] in feats:
        raise ParameterError(f"parameter 'features': includes the label column {p['label']!r}")
    if len(feats) > MAX_FEATURES:
        raise ParameterError(f"parameter 'features': at most {MAX_FEATURES}")
    if len(p["feature_bounds"]) not in (1, len(feats)):
        raise ParameterError("parameter 'feature_bounds': one lo:hi for all features, or one "
                             "per feature")
    if not p["label_lower"] < p["label_upper"]:
        raise ParameterError("parameter 'label_upper': must be greater than label_lower")
    if p["max_contributions"] != 1 and not p["identity"]:
        raise ParameterError("parameter 'max_contributions': needs identity")


check_params = make_check_params(NAME, PARAMS, _cross_check)
privacy_cost = dp.privacy_cost


def bounds(p: dict[str, Any]) -> list[tuple[float, float]]:
    """(lo, hi) of each entry of z = (features, 1, label)."""
    pairs = [tuple(float(v) for v in b.split(":")) for b in p["feature_bounds"]]
    if len(pairs) == 1:
        pairs = pairs * len(p["features"])
    return [*pairs, (1.0, 1.0), (p["label_lower"], p["label_upper"])]  # type: ignore[list-item]


def check_schemas(schemas: dict[str, pa.Schema], params: dict[str, Any]) -> None:
    for ds, schema in schemas.items():
        cols = columns_of(ds, schema)
        named = [("label", params["label"]), *(("features", f) for f in params["features"])]
        if params["identity"]:
            named.append(("identity", params["identity"]))
        for param, col in named:
            if col not in cols:
                raise SchemaMismatch(f"dataset {ds!r}: no column {col!r} (parameter {param!r})")
            if param != "identity" and not is_numeric(cols[col]):
                raise SchemaMismatch(f"dataset {ds!r}: column {col!r} must be numeric")


def _rows(inputs: list[tuple[str, pa.Table]], p: dict[str, Any]) -> pa.Table:
    names = [*p["features"], p["label"]]
    parts = []
    for _, table in inputs:
        cols = {f"z{j}": table[c].cast(pa.float64()) for j, c in enumerate(names)}
        if p["identity"]:
            cols["identity"] = table[p["identity"]].cast(pa.string())
        part = pa.table(cols)
        keep = None
        for j in range(len(names)):
            ok = pc.and_kleene(pc.is_valid(part[f"z{j}"]), pc.is_finite(part[f"z{j}"]))
            keep = ok if keep is None else pc.and_kleene(keep, ok)
        parts.append(part.filter(pc.fill_null(keep, False)))  # per-row: costs no privacy
    return pa.concat_tables(parts)


def _product_bounds(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    prods = [a[0] * b[0], a[0] * b[1], a[1] * b[0], a[1] * b[1]]
    lo, hi = min(prods), max(prods)
    return (lo, hi) if lo < hi else (lo - 0.5, hi + 0.5)  # OpenDP wants lo < hi


def noised_moments(z: np.ndarray, zb: list[tuple[float, float]], k: int, epsilon: float
                   ) -> np.ndarray:
    """The noised Z'Z: each upper-triangle entry's sum of z_i z_j is OpenDP's clamped sum;
    one identity's k rows move entry (i, j) by at most OpenDP's bound for it, so the vector
    of entries by at most the total of those bounds, and one Laplace draw over it spends
    epsilon."""
    d = z.shape[1]
    pairs = [(i, j) for i in range(d) for j in range(i, d)]
    sums, sens = [], 0.0
    for i, j in pairs:
        lo, hi = _product_bounds(zb[i], zb[j])
        sums.append(dp.clamped_sum(z[:, i] * z[:, j], lo, hi))
        sens += dp.sum_sensitivity(lo, hi, k)
    noised = dp.noisy_vector(sums, sens, epsilon)
    m = np.zeros((d, d))
    for (i, j), v in zip(pairs, noised, strict=True):
        m[i, j] = m[j, i] = v
    return m


def solve(m: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    """(coefficients, intercept) from a noised [X 1 y]'[X 1 y] (post-processing)."""
    d = m.shape[0]
    a, b = m[: d - 1, : d - 1].copy(), m[: d - 1, d - 1]
    p = d - 2
    a[np.arange(p), np.arange(p)] += alpha
    w, *_ = np.linalg.lstsq(a, b, rcond=None)
    return w[:p], float(w[p])


def run(inputs: list[tuple[str, pa.Table]], params: dict[str, Any]) -> dict[str, Any]:
    table = _rows(inputs, params)
    k = params["max_contributions"] if params["identity"] else 1
    table = dp.bound_contributions(table, "identity" if params["identity"] else None, k)
    zb = bounds(params)
    d = len(zb)
    z = np.empty((table.num_rows, d))
    for j, (lo, hi) in enumerate(zb):
        if j == d - 2:
            z[:, j] = 1.0
            continue
        col = j if j < d - 2 else d - 2
        z[:, j] = np.clip(table[f"z{col}"].to_numpy(zero_copy_only=False), lo, hi)
    m = noised_moments(z, zb, k, params["epsilon"])
    coef, intercept = solve(m, params["alpha"])
    return {
        "coefficients": {f: float(v) for f, v in zip(params["features"], coef, strict=True)},
        "intercept": intercept,
        "features": list(params["features"]),
        "alpha": params["alpha"],
        "n_samples_noised": max(0, round(float(m[d - 2, d - 2]))),
        "method": "sufficient statistics perturbation",
        "privacy": dp.privacy_note(params, "laplace"),
    }
