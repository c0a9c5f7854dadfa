"""A task's opened result as data: tables as Arrow (pandas, polars), models in their column
order and as fitted scikit-learn estimators or XGBoost boosters.

The sealed plaintext is sorted-key JSON, so every mapping in it (coefficients, parameters)
comes back in string order (x0, x1, x10, ...); each model result also carries its ordered
``features`` (model aggregation: ``names``), and `ordered` puts the mappings back in that
order. Tables (``sql``, ``user_code``) carry an Arrow IPC stream next to their JSON rows, and
`Result.to_arrow` reads that, so column types and nulls are as the executor computed them.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from teeflow.attestation.evidence import Claims
from teeflow.core.errors import InputError, MissingPackage, ResultKindError

LOGISTIC = ("logistic_regression", "federated_logistic_regression")
LINEAR = ("linear_regression", "dp_linear_regression")
TABLES = ("sql", "user_code")
MAX_ARROW = 1 << 30  # base64 characters of a result table: the executor's result-file cap


def ordered(value: dict[str, Any]) -> dict[str, Any]:
    """`value` with its coefficients (parameters) in the model's own column order, when it
    names that order and the names match exactly; anything else is returned as it is."""
    out = dict(value)
    for key, names in (("coefficients", "features"), ("parameters", "names")):
        mapping, order = out.get(key), out.get(names)
        if isinstance(mapping, dict) and isinstance(order, list) and \
                sorted(map(str, order)) == sorted(mapping) and len(order) == len(mapping):
            out[key] = {str(n): mapping[str(n)] for n in order}
    return out


def _model_kind(compute: str, value: dict[str, Any]) -> str:
    """"logistic", "linear" or "xgboost"; a vertical result names its model."""
    name = str(value.get("model_name") or compute)
    if name in LOGISTIC:
        return "logistic"
    if name in LINEAR:
        return "linear"
    if name == "xgboost":
        return "xgboost"
    raise ResultKindError(f"result of {compute or 'unknown computation'}: not a model "
                          "(to_sklearn takes logistic_regression, linear_regression, "
                          "dp_linear_regression, federated_logistic_regression, xgboost, "
                          "vertical)")


@dataclass(frozen=True)
class Result:
    """A task's result, opened with your key, and the executor's claims as you appraised them."""

    task_id: str
    value: dict[str, Any]
    simulated: bool
    tee: str
    claims: Claims
    raw: bytes
    compute: str = ""

    # -- tables ---------------------------------------------------------------------------
    def is_table(self) -> bool:
        return isinstance(self.value.get("columns"), list) and \
            isinstance(self.value.get("rows"), list) and self.value.get("kind", "table") == "table"

    def to_arrow(self) -> pa.Table:
        """A table result (sql, user_code returning a table) as the executor computed it."""
        if not self.is_table():
            raise ResultKindError(f"result of {self.compute or 'this task'}: not a table "
                                  "(to_arrow takes sql and user_code table results)")
        encoded = self.value.get("arrow")
        if encoded is None:  # a result from an executor before the Arrow copy: JSON types
            columns = [str(c) for c in self.value["columns"]]
            rows = self.value["rows"]
            try:
                return pa.Table.from_arrays([pa.array([r[i] for r in rows])
                                             for i in range(len(columns))], names=columns)
            except (IndexError, TypeError, pa.ArrowException):
                raise InputError("result fields 'columns' and 'rows': not a table") from None
        if not isinstance(encoded, str) or len(encoded) > MAX_ARROW:
            raise InputError("result field 'arrow': not a base64 string within "
                             f"{MAX_ARROW} characters")
        try:
            data = base64.b64decode(encoded, validate=True)
            table = pa.ipc.open_stream(pa.py_buffer(data)).read_all()
        except (binascii.Error, ValueError, pa.ArrowException):
            raise InputError("result field 'arrow': not an Arrow IPC stream") from None
        if table.column_names != [str(c) for c in self.value["columns"]]:
            raise InputError("result field 'arrow': its columns are not the result's")
        return table

    def to_polars(self) -> Any:
        """The table result as a polars DataFrame (polars is not a dependency of teeflow)."""
        try:
            import polars
        except ImportError:
            raise MissingPackage("to_polars needs polars: pip install polars") from None
        return polars.from_arrow(self.to_arrow())

    def to_pandas(self, arrow_dtypes: bool = False) -> Any:
        """A table result as its DataFrame: integer and boolean columns holding nulls become
        pandas' nullable dtypes (Int64, boolean), so ints stay ints and nulls stay missing
        (`arrow_dtypes`: every column as pandas' ArrowDtype). A model: its coefficients
        (parameters) as (name, value) rows in column order, then the intercept. A DP
        aggregate by category: a row per category. Anything else: the result's fields,
        flattened."""
        import pandas as pd

        if self.is_table():
            return _frame(self.to_arrow(), arrow_dtypes)
        value = ordered(self.value)
        if isinstance(value.get("groups"), list):  # dp_aggregate by category: one row each
            return pd.DataFrame(value["groups"])
        for key in ("coefficients", "parameters"):
            if isinstance(value.get(key), dict):
                items = list(value[key].items())
                if "intercept" in value:
                    items.append(("intercept", value["intercept"]))
                return pd.DataFrame(items, columns=["name", "value"])
        return pd.json_normalize(value)

    # -- models ---------------------------------------------------------------------------
    def features(self) -> list[str]:
        """The model's feature columns in its own order (the order of `to_sklearn`'s input)."""
        feats = self.value.get("features")
        if not isinstance(feats, list) or not all(isinstance(f, str) for f in feats):
            raise ResultKindError(f"result of {self.compute or 'this task'}: names no "
                                  "features (not a model)")
        return list(feats)

    def to_sklearn(self) -> Any:
        """A fitted scikit-learn estimator whose predictions are the model's: a
        LogisticRegression or LinearRegression (coef_, intercept_, classes_,
        feature_names_in_ in the model's column order), or for xgboost an XGBClassifier /
        XGBRegressor around the trained booster (its predict() gives 0/1, the positions in
        ``value["classes"]``)."""
        kind = _model_kind(self.compute, self.value)
        if kind == "xgboost":
            return self._xgb_estimator()
        import numpy as np
        from sklearn.linear_model import LinearRegression, LogisticRegression

        value, feats = ordered(self.value), self.features()
        coef = np.array([float(value["coefficients"][f]) for f in feats], dtype=np.float64)
        model: Any
        if kind == "logistic":
            model = LogisticRegression()
            model.coef_ = coef.reshape(1, -1)
            model.intercept_ = np.array([float(value["intercept"])])
            model.classes_ = np.array(value.get("classes", [0, 1]))
        else:
            model = LinearRegression()
            model.coef_ = coef
            model.intercept_ = float(value["intercept"])
        model.n_features_in_ = len(feats)
        model.feature_names_in_ = np.array(feats, dtype=object)
        return model

    def to_booster(self) -> Any:
        """An xgboost result's trained model as an ``xgboost.Booster``, its feature names
        set in the model's column order."""
        if _model_kind(self.compute, self.value) != "xgboost":
            raise ResultKindError(f"result of {self.compute or 'this task'}: not an xgboost "
                                  "model (to_booster)")
        try:
            import xgboost
        except ImportError:
            raise MissingPackage("to_booster needs xgboost: pip install xgboost") from None
        model = self.value.get("model")
        if not isinstance(model, dict):
            raise ResultKindError("xgboost result: it carries no model")
        booster = xgboost.Booster()
        try:
            booster.load_model(bytearray(json.dumps(model), "utf-8"))
        except xgboost.core.XGBoostError:
            raise InputError("xgboost result field 'model': XGBoost does not load it") from None
        feats = self.features()
        if booster.num_features() != len(feats):
            raise InputError("xgboost result: the model's feature count is not its features'")
        booster.feature_names = feats
        return booster

    def _xgb_estimator(self) -> Any:
        import xgboost

        booster = self.to_booster()
        if self.value.get("objective", "binary:logistic") == "binary:logistic":
            model: Any = xgboost.XGBClassifier()
            model._Booster = booster
            # XGBClassifier's classes_ is always 0..n-1: predict() gives 0/1, which index the
            # result's sorted `classes`
            model.n_classes_ = 2
        else:
            model = xgboost.XGBRegressor()
            model._Booster = booster
        model.n_estimators = int(self.value.get("n_estimators") or booster.num_boosted_rounds())
        return model


def _frame(table: pa.Table, arrow_dtypes: bool) -> Any:
    import pandas as pd

    if arrow_dtypes:
        return table.to_pandas(types_mapper=pd.ArrowDtype)
    frame = table.to_pandas()
    for i, column in enumerate(table.columns):
        kind = column.type
        if column.null_count and (pa.types.is_integer(kind) or pa.types.is_boolean(kind)):
            dtype = "boolean" if pa.types.is_boolean(kind) else \
                f"{'U' if pa.types.is_unsigned_integer(kind) else ''}Int{kind.bit_width}"
            frame.isetitem(i, pd.array(column.to_pylist(), dtype=dtype))
    return frame
