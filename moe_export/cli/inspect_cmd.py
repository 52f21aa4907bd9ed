"""`moe-export inspect CKPT`: family, base model, per-unit E/k/r and routers, parameter counts, notices.

Reads only the adapter (and, for GOAT, base weights tensor by tensor); never builds the full model.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.table import Table

from moe_export.cli.app import command, console, parse_int_list, print_json, report_console
from moe_export.cli.options import BASE_OPTION, CKPT_ARGUMENT, FAMILY_OPTION, TOP_K_OPTION


def _router_cell(row: dict[str, Any]) -> str:
    router = row["router"]
    if router is None:
        return "-"
    select = router["select"]
    if select == "topk":
        select = f"top{router['top_k']}" + ("/renorm" if router["renormalize"] else "")
    elif select == "top_p":
        select = f"top_p {router['top_p']}"
    dtype = router["compute_dtype"].replace("float", "fp")
    return f"{router['kind']} {select} {dtype}" + (f" gate={router['task_gate']}" if router["task_gate"] else "")


def _render(info: dict[str, Any]) -> None:
    title = info["family_title"] + (" (canonical layout)" if info["layout"] == "canonical" else "")
    console.print(f"[bold]{info['checkpoint']}[/]  family: [bold cyan]{title}[/]  base: {info['base_model']}")
    table = Table(box=box.SIMPLE_HEAD, header_style="bold", pad_edge=False)
    for col in ("module", "E", "k", "r", "router", "shared", "params"):
        table.add_column(col, justify="right" if col in ("E", "k", "r", "params") else "left", no_wrap=col == "module")
    for row in info["units"]:
        shared = ", ".join(f"{s['origin']} r{s['rank']}" for s in row["shared"]) or "-"
        rank = "-" if row["rank"] is None else str(row["rank"]) + (" (shared A)" if row["shared_a"] else "")
        table.add_row(
            row["module"],
            str(row["num_experts"]),
            "-" if row["k"] is None else str(row["k"]),
            rank,
            _router_cell(row),
            shared,
            f"{sum(row['params'].values()):,}",
        )
    report_console().print(table, highlight=False)
    params = info["parameters"]
    parts = ", ".join(f"{k} {v:,}" for k, v in params.items() if k != "total" and v)
    console.print(
        f"{info['num_units']} units ({info['num_routed_units']} routed), parameters {params['total']:,} ({parts})"
    )
    for name, gate in info["task_gates"].items():
        line = (
            f"task gate {name}: {gate['num_tasks']} task ids x {gate['embedding_dim']} -> {gate['num_experts']} experts"
        )
        if "weights_for_task" in gate:
            line += f"; task {info['task_id']} weights {gate['weights_for_task']}"
        console.print(line)
    for notice in info["notices"]:
        console.print(f"[yellow]notice[/]: {notice}", highlight=False)
    for warning in info["warnings"]:
        console.print(f"[yellow]warning[/]: {warning}", highlight=False)


@command("inspect")
def inspect(
    ckpt: Path = CKPT_ARGUMENT,
    base: Path | None = BASE_OPTION,
    family: str | None = FAMILY_OPTION,
    top_k: str | None = TOP_K_OPTION,
    task_id: int | None = typer.Option(None, "--task-id", help="Task id (task-gated MOELoRA): show its weights."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON only (on stdout)."),
) -> None:
    """Describe a checkpoint: family, base model, E/k/r and router per unit, parameter counts, notices."""
    from moe_export.formats import FAMILIES, LoadOptions
    from moe_export.ir import MANIFEST_NAME
    from moe_export.ir.summary import describe_adapter
    from moe_export.reference.loading import load_adapter

    options = LoadOptions(top_k=parse_int_list(top_k, "--top-k"), task_id=task_id)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        adapter, _ = load_adapter(ckpt, base_model=base, family=family, options=options)
    fam = FAMILIES.get(adapter.family)
    info = describe_adapter(adapter, fam.title if fam else None, task_id)
    info = {
        "checkpoint": str(ckpt),
        "layout": "canonical" if (ckpt / MANIFEST_NAME).is_file() else adapter.family,
        **info,
        "warnings": [str(w.message) for w in caught],
    }
    if as_json:
        print_json(info)
    else:
        _render(info)
