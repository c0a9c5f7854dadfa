"""`teeflow computations`: what each computation does, its parameters, and which of them
can make a result reveal rows (what an owner's approval rule must bind).

Read from this installation's own catalog (`teeflow.compute`), with no scheduler and no
key; the code digest a task carries is the one its executor publishes, not this one.
"""

from __future__ import annotations

from typing import Any

import click

from teeflow.cli.common import console, echo_json


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else f"{v:g}"


def _param_line(p: dict[str, Any], revealing: bool) -> str:
    bounds = []
    if "min" in p:
        bounds.append(f"{'>' if p['min_exclusive'] else '>='} {_num(p['min'])}")
    if "max" in p:
        bounds.append(f"{'<' if p['max_exclusive'] else '<='} {_num(p['max'])}")
    if "choices" in p:
        bounds.append("one of " + ", ".join(p["choices"]))
    default = "required" if p["required"] else "optional" if p["default"] is None \
        else f"default {p['default']!r}"
    extra = f"; {'; '.join(bounds)}" if bounds else ""
    mark = "  [REVEALING]" if revealing else ""
    return f"  {p['name']} ({p['type']}, {default}{extra}){mark}\n      {p['help']}"


@click.command()
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def computations(name: str | None, as_json: bool) -> None:
    """The computations: description, parameters (type, default, bounds, help) and the
    parameters that can reveal rows. NAME: just that one, in full."""
    from teeflow import compute

    found = [compute.get(name).describe(digest=False)] if name else \
        compute.describe_all(digest=False)
    for entry in found:  # every parameter it takes, not just the model-independent ones
        comp = compute.get(entry["name"])
        entry["params"] = [p.describe() for p in comp.all_params or comp.params]
    if as_json:
        echo_json(found if name is None else found[0])
        return
    for entry in found:
        revealing = set(entry["revealing"])
        console.print(f"[bold]{entry['name']}[/] ({entry['layout']} layout, at least "
                      f"{entry['min_datasets']} dataset(s))")
        console.print(f"  {entry['description']}", highlight=False, markup=False)
        if not name:
            params = ", ".join(p["name"] + ("*" if p["name"] in revealing else "")
                               for p in entry["params"])
            console.print(f"  parameters: {params or '-'}", highlight=False, markup=False)
            continue
        for p in entry["params"]:
            console.print(_param_line(p, p["name"] in revealing), highlight=False,
                          markup=False)
        if entry["revealing"]:
            console.print(f"  reveals: {', '.join(entry['revealing'])} (an owner's approval "
                          "rule must bind each of these to match)", highlight=False,
                          markup=False)
        else:
            console.print("  reveals: none of its parameters can make a result reveal rows "
                          "(an approval rule need bind none)", highlight=False, markup=False)
    if not name:
        console.print("* can reveal rows: an owner's approval rule must bind it. "
                      "`teeflow computations NAME` for the parameters in full.",
                      highlight=False, markup=False)
