"""What the differentially private computations share: their privacy parameters, the bound on
each identity's contribution, and the noise, which always comes from OpenDP (never a sampler
of ours). Runs inside the executor; OpenDP is imported only when noise is drawn.

A DP computation's release is epsilon-DP (pure, delta 0) with respect to adding or removing
one identity's rows (every row, if no identity column is named), once each identity is cut
to at most ``max_contributions`` rows. Its result says so (``privacy``), and its module
defines ``privacy_cost(params) -> (epsilon, delta)``: what the owners' providers debit from
their datasets' budgets when they sign the task.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from teeflow.compute.params import Param

# The most one task may spend: beyond it the noise is too small to hide anyone.
EPSILON_CAP = 10.0
MAX_CONTRIBUTIONS_CAP = 100
# Declared bounds far beyond this overflow float sums' accounting; nobody needs them.
BOUND_CAP = 1e12

EPSILON = Param("epsilon", "float", required=True, low=0.0, low_open=True, high=EPSILON_CAP,
                help="the privacy loss this release spends (pure epsilon-DP); debited from "
                     "each input dataset's budget by its owner")
IDENTITY = Param("identity", "str",
                 help="identity column: each identity keeps at most max_contributions rows "
                      "(chosen at random inside the TEE); default: each row is one identity")
MAX_CONTRIBUTIONS = Param("max_contributions", "int", default=1, low=1,
                          high=MAX_CONTRIBUTIONS_CAP,
                          help="rows kept per identity (needs identity)")
PRIVACY_PARAMS = (EPSILON, IDENTITY, MAX_CONTRIBUTIONS)


def privacy_cost(params: dict[str, Any]) -> tuple[float, float]:
    """(epsilon, delta) of one release: what its input datasets' budgets are charged."""
    return float(params["epsilon"]), 0.0


def privacy_note(params: dict[str, Any], mechanism: str) -> dict[str, Any]:
    """The part of a DP result that says what it spent and what it protects."""
    return {
        "differentially_private": True,
        "epsilon": float(params["epsilon"]),
        "delta": 0.0,
        "mechanism": mechanism,
        "unit": f"identity {params['identity']!r}" if params.get("identity") else "row",
        "max_contributions": int(params["max_contributions"] if params.get("identity") else 1),
        "noise": "OpenDP",
    }


def opendp() -> Any:
    """OpenDP's prelude, with its "contrib" features on: OpenDP ships the measurements used
    here (clamp, sum, Laplace) behind that flag until their proofs have passed its own
    vetting; teeflow accepts them knowingly rather than writing samplers of its own."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    return dp


def bound_contributions(table: pa.Table, identity: str | None, k: int) -> pa.Table:
    """At most ``k`` rows per identity, chosen uniformly at random with the executor's own
    entropy (the initiator cannot pick them); rows whose identity is null are dropped, as
    they cannot be bounded. Without an identity column each row is its own identity."""
    if identity is None or table.num_rows == 0:
        return table
    table = table.filter(pc.is_valid(table[identity]))
    n = table.num_rows
    if n == 0:
        return table
    codes = np.asarray(
        pc.dictionary_encode(table[identity]).combine_chunks().indices, dtype=np.int64)
    perm = np.random.default_rng().permutation(n)
    order = perm[np.argsort(codes[perm], kind="stable")]
    ranked = codes[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
    sizes = np.diff(np.r_[starts, n])
    rank = np.arange(n) - np.repeat(starts, sizes)
    return table.take(pa.array(np.sort(order[rank < k])))


def finite_values(table: pa.Table, column: str) -> tuple[pa.Table, np.ndarray]:
    """The rows whose ``column`` holds a finite number, and those numbers as float64. Dropping
    a row is a per-row step, so it costs no privacy, and it raises no error that a value
    could steer."""
    values = table[column].cast(pa.float64())
    keep = pc.and_kleene(pc.is_valid(values), pc.is_finite(values)).fill_null(False)
    kept = table.filter(keep)
    return kept, kept[column].cast(pa.float64()).to_numpy(zero_copy_only=False)


def _scale(sensitivity: float, epsilon: float) -> float:
    # a hair above sensitivity/epsilon, so rounding never makes the loss exceed epsilon
    return float(sensitivity) / epsilon * (1 + 1e-9)


def noisy_counts(counts: list[int], k: int, epsilon: float) -> list[int]:
    """Counts (one per declared category, or one) plus discrete Laplace noise: an identity
    with k rows changes the vector's L1 norm by at most k, so one draw over the vector
    spends epsilon whatever the number of categories."""
    dp = opendp()
    meas = dp.m.make_laplace(dp.vector_domain(dp.atom_domain(T=int)), dp.l1_distance(T=int),
                             _scale(k, epsilon))
    if meas.map(k) > epsilon * (1 + 1e-6):
        raise AssertionError("count noise spends more than epsilon")
    return [int(v) for v in meas([int(c) for c in counts])]


def sum_sensitivity(lower: float, upper: float, k: int) -> float:
    """OpenDP's bound on how far one identity's k clamped rows move a float sum (rounding
    included)."""
    dp = opendp()
    t = dp.t.make_clamp(dp.vector_domain(dp.atom_domain(T=float, nan=False)),
                        dp.symmetric_distance(), (float(lower), float(upper))) >> dp.t.then_sum()
    return float(t.map(k))


def clamped_sum(values: np.ndarray, lower: float, upper: float) -> float:
    """OpenDP's clamped sum (its own float summation, the one its sensitivity bound is for)."""
    dp = opendp()
    t = dp.t.make_clamp(dp.vector_domain(dp.atom_domain(T=float, nan=False)),
                        dp.symmetric_distance(), (float(lower), float(upper))) >> dp.t.then_sum()
    return float(t(values.tolist()))


def noisy_vector(values: list[float], sensitivity: float, epsilon: float) -> list[float]:
    """Float Laplace noise over a vector whose L1 sensitivity is ``sensitivity``."""
    dp = opendp()
    meas = dp.m.make_laplace(dp.vector_domain(dp.atom_domain(T=float, nan=False)),
                             dp.l1_distance(T=float), _scale(sensitivity, epsilon))
    if meas.map(sensitivity) > epsilon * (1 + 1e-6):
        raise AssertionError("noise spends more than epsilon")
    return [float(v) for v in meas([float(v) for v in values])]
