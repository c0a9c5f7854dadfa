"""The seed system's (PrimiHub-style) submit form, translated into ordinary arguments.

`teeflow submit --task_lang=proto --task_type=6 --params="name:TYPE:flag:value,..."`
names the datasets, the executor and the computation inside `--params`; this
module turns that into what `submit` takes otherwise. Pure: strings in, values out.
"""

from __future__ import annotations

from dataclasses import dataclass

from teeflow.core.errors import InputError

DEFAULT_COMPUTE = "model_aggregation"


@dataclass(frozen=True)
class SeedForm:
    """`submit`'s own arguments, once the seed form is folded in."""

    datasets: str | None
    executor: str | None
    compute: str | None
    params: dict[str, str]


def parse_params(text: str) -> dict[str, str]:
    """The seed's form: `name:TYPE:flag:value,...` (a value may hold ':')."""
    out: dict[str, str] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        parts = item.split(":", 3)
        if len(parts) != 4:
            raise InputError(f"--params entry {item!r} is not name:TYPE:flag:value")
        out[parts[0]] = parts[3]
    return out


def apply_seed_form(task_lang: str | None, task_type: str | None, params: str,
                    given: SeedForm) -> SeedForm:
    """Fill what `given` (the explicit flags) leaves out from the seed's `--params`.

    Only a TEE task (`proto`, type 6) is known; `datasets` are `;`-separated there.
    An entry that an explicit flag already answers stays among the parameters, and
    explicit `--param` values win over the seed's.
    """
    if task_lang not in (None, "proto") or task_type not in (None, "6"):
        raise InputError("seed form: only --task_lang=proto --task_type=6 (TEE) is known")
    seed = parse_params(params)
    datasets = given.datasets or seed.pop("datasets", "").replace(";", ",")
    executor = given.executor or seed.pop("server", None)
    compute = given.compute or seed.pop("compute", DEFAULT_COMPUTE)
    return SeedForm(datasets, executor, compute, {**seed, **given.params})
