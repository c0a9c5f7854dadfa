"""The catalogue of public errors: what a computation may say when it fails while reading data.

Such an error leaves the enclave unsealed (to the scheduler, every party, the audit log and
the host's log), so it is a fixed message from CATALOGUE plus fields the receivers already
knew: dataset, column and parameter names from the signed spec and schemas, limits from the
spec or the executor's config. Never a cell value, category, id, statistic, row position or
count of another party's data. The runner passes on only errors built here (``public``);
any other error raised while data is read becomes "computation X failed (ComputeError)".

Errors raised before any data is read (check_params, check_schemas over the signed schemas)
can only quote the spec and the schemas, and keep their own messages.
"""

from __future__ import annotations

import re
from typing import Any

from teeflow.core.errors import ComputeError, TeeflowError

CATALOGUE: dict[str, str] = {
    "empty": "the datasets have no rows",
    "no_rows": "{computation}: the datasets have no rows",
    "dataset_no_rows": "dataset {dataset!r}: no rows",
    "nulls": "dataset {dataset!r}: column {column!r} has null values",
    "non_finite": "dataset {dataset!r}: {kind} column {column!r} has a non-finite value "
                  "(NaN or infinity)",
    "label_not_binary": "label column {column!r} must have exactly two distinct values",
    "label_streamed_numeric": "{computation}: a label streamed from disk must be numeric",
    "no_train_rows": "test_fraction {test_fraction} leaves no rows to train on",
    "fit_failed": "{computation}: fitting the model failed",
    "not_installed": "{computation}: the {package} package is not installed",
    "duplicate_names": "dataset {dataset!r}: duplicate parameter names",
    "names_differ": "dataset {dataset!r}: parameter names differ from dataset {other!r}",
    "values_non_finite": "dataset {dataset!r}: non-finite parameter values",
    "n_samples_vary": "dataset {dataset!r}: n_samples must be the same in every row",
    "n_samples_positive": "dataset {dataset!r}: n_samples must be positive",
    "duplicate_ids": "dataset {dataset!r}: id column {column!r} has duplicate values; IDs "
                     "must be unique within a dataset",
    "small_intersection": "{computation}: the datasets share fewer IDs than the owners' "
                          "minimum of {limit}; nothing is released",
    "too_few_parties": "{computation}: fewer parties than the owners' minimum of {limit}",
    "internal": "{computation}: internal error",
    "too_large_for_memory": "{computation} needs its whole input in memory, more than the "
                            "executor's budget of {limit} bytes",
    "result_too_large": "{computation}: the result has more than {limit} {unit}",
    "out_of_memory": "{computation}: the query ran out of memory (memory_limit {limit}) {how}",
    "query_failed": "{computation}: the query failed ({kind})",
    "small_group": "{computation} output policy: an output group counts fewer than "
                   "min_group_size={limit} input rows of {source}; nothing is returned",
    "federated_uploads": "{computation} runs in rounds with the providers; it takes no uploads",
    "user_code": "{message}",  # the sandbox's own fixed messages, see user_code_error
}

# The only fields a public message may carry, each a name or limit the receivers knew.
FIELDS = frozenset({"computation", "dataset", "other", "column", "kind", "test_fraction",
                    "limit", "unit", "package", "how", "source", "message"})


def public(code: str, cls: type[TeeflowError] = ComputeError, **fields: Any) -> TeeflowError:
    """The catalogued error ``code`` with ``fields`` filled in."""
    template = CATALOGUE[code]
    extra = set(fields) - FIELDS
    if extra:
        raise ValueError(f"public error {code}: field(s) {sorted(extra)} are not public")
    for value in fields.values():
        if not isinstance(value, str | int | float):
            raise TypeError(f"public error {code}: a field must be a name or a number")
    exc = cls(template.format(**fields))
    exc.public = code
    return exc


def is_public(exc: BaseException) -> bool:
    return isinstance(exc, TeeflowError) and getattr(exc, "public", None) in CATALOGUE


_EXIT = re.compile(r"exit status -?\d+")


def user_code_error(exc: TeeflowError) -> TeeflowError:
    """A sandbox failure as a public error. The sandbox's messages are fixed and quote nothing
    the code printed or raised; only an exit status is the code's own choice (a number it
    can compute from the data), so it is dropped."""
    message = _EXIT.sub("a non-zero exit status", str(exc))[:300]
    return public("user_code", type(exc), message=message)
