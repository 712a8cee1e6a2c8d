"""The AdaLoRA report: where the rank went (table and heat map) and the budget over training.

`write_rank_report(directory, method, opt_state)` writes ``directory/rank_report/`` atomically:
``ranks.json`` (per layer: path, layer index, module, kept rank; the budget per step),
``ranks.md`` (the table), ``ranks.png`` (a heat map of rank by layer and module) and
``budget.png`` (the budget schedule, with the ranks kept at the end marked).

Example:
    >>> import jax.numpy as jnp, optax, tempfile, pathlib
    >>> from peft_jax.methods.adalora import AdaLora
    >>> from peft_jax.train.rank_allocation import allocate_ranks
    >>> method = AdaLora(init_r=2, target_r=1, total_step=4)
    >>> params = {"layers": [{"q": {"default": {"lora_a": jnp.ones((3, 2)), "lora_e": jnp.ones(2),
    ...                                          "lora_b": jnp.ones((2, 3))}}}]}
    >>> state = allocate_ranks(optax.sgd(0.1), method).init(params)
    >>> report = rank_report(method, state)
    >>> report["layers"][0]["layer"], report["layers"][0]["module"], report["layers"][0]["rank"]
    (0, 'q', 2)
    >>> out = write_rank_report(pathlib.Path(tempfile.mkdtemp()), method, state)
    >>> sorted(p.name for p in out.iterdir())
    ['budget.png', 'ranks.json', 'ranks.md', 'ranks.png']
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from peft_jax import errors
from peft_jax.io.atomic import atomic_directory
from peft_jax.methods.adalora import AdaLora
from peft_jax.train.rank_allocation import budget_schedule, rank_pattern

__all__ = ["rank_report", "write_rank_report"]


def _parts(key: str) -> list[str]:
    """``"['encoder']['layer'][0]['query']['default']"`` -> ``['encoder', 'layer', '0', 'query', 'default']``."""
    return [a or b for a, b in re.findall(r"\['([^']*)'\]|\[(\d+)\]", key)] or key.split("/")


def rank_report(method: AdaLora, opt_state: Any) -> dict[str, Any]:
    """The report's data: ``{"layers": [...], "budget": [...], ...}`` (JSON-ready)."""
    pattern = rank_pattern(opt_state)
    layers = []
    for key, kept in pattern.items():
        parts = _parts(key)
        # the adapter name is the last part; the module the one before it
        numbers = [int(p) for p in parts if p.isdigit()]
        if not numbers:
            numbers = [int(n) for p in parts for n in re.findall(r"\d+", p)]
        layers.append({"path": "/".join(parts[:-1]), "adapter": parts[-1],
                       "layer": numbers[-1] if numbers else None,
                       "module": parts[-2] if len(parts) > 1 else parts[0], "rank": int(sum(kept))})
    n = len(layers)
    budget = [budget_schedule(method, n, t)[0] for t in range(method.total_step + 1)]
    return {"init_r": method.init_r, "target_r": method.target_r, "total_step": method.total_step,
            "tinit": method.tinit, "tfinal": method.tfinal, "delta_t": method.delta_t,
            "layers": layers, "kept_total": sum(x["rank"] for x in layers),
            "budget_initial": method.init_r * n, "budget_target": method.target_r * n,
            "budget": budget}


def _table(report: dict[str, Any]) -> str:
    lines = [f"# AdaLoRA ranks (init_r {report['init_r']}, target_r {report['target_r']}, "
             f"total_step {report['total_step']})", "",
             f"Kept {report['kept_total']} of {report['budget_initial']} ranks "
             f"(target budget {report['budget_target']}).", "",
             "| layer | module | path | rank |", "|---:|---|---|---:|"]
    for x in report["layers"]:
        lines.append(f"| {x['layer']} | {x['module']} | `{x['path']}` | {x['rank']} |")
    return "\n".join(lines) + "\n"


def _plots(report: dict[str, Any], directory: Path) -> None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
        from matplotlib.figure import Figure  # noqa: PLC0415
    except ImportError as e:
        raise errors.MissingPackageError("the AdaLoRA report's plots need matplotlib: pip install matplotlib") from e
    layers = sorted({x["layer"] for x in report["layers"]}, key=lambda v: (v is None, v))
    modules = sorted({x["module"] for x in report["layers"]})
    grid = np.full((len(modules), len(layers)), np.nan)
    for x in report["layers"]:
        grid[modules.index(x["module"]), layers.index(x["layer"])] = x["rank"]
    fig = Figure(figsize=(max(4.0, 0.5 * len(layers) + 2), max(2.5, 0.5 * len(modules) + 1.5)), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=report["init_r"], aspect="auto")
    ax.set_xticks(range(len(layers)), [str(v) for v in layers])
    ax.set_yticks(range(len(modules)), modules)
    ax.set_xlabel("layer")
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            ax.text(j, i, int(value), ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(image, ax=ax, label="rank kept")
    ax.set_title(f"AdaLoRA ranks (init {report['init_r']}, target {report['target_r']})")
    fig.tight_layout()
    fig.savefig(directory / "ranks.png", format="png")

    fig = Figure(figsize=(6, 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(range(len(report["budget"])), report["budget"], label="budget")
    ax.axhline(report["kept_total"], linestyle="--", color="gray", label=f"kept {report['kept_total']}")
    ax.set_xlabel("step")
    ax.set_ylabel("total rank")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(directory / "budget.png", format="png")


def write_rank_report(directory: str | os.PathLike, method: AdaLora, opt_state: Any) -> Path:
    """Writes the report to ``directory/rank_report/`` (replaced atomically); returns that path."""
    report = rank_report(method, opt_state)
    target = Path(directory) / "rank_report"
    with atomic_directory(target) as tmp:
        (tmp / "ranks.json").write_text(json.dumps(report, indent=2))
        (tmp / "ranks.md").write_text(_table(report))
        _plots(report, tmp)
    return target
