"""The end-of-run summary table (rich), built from metrics.json's content."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(v: Any, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def _tokens_per_s(figures: dict[str, Any]) -> float | None:
    """The stage's training tokens/s (metrics.json's train_throughput), None if it trained no step."""
    return (figures.get("train_throughput") or {}).get("tokens_per_s")


def print_summary(metrics: dict[str, Any], run_dir: str, console: Console | None = None) -> None:
    console = console or Console(width=None if Console().is_terminal else 110)
    c = metrics["config"]
    table = Table(title=f"qgplm {c['model']} on {c['task']}: {c['method']} {c['bits']} (stage={c['stage']})")
    t, wall = metrics["teacher"], metrics["wall_time_s"]
    task_keys = [k for k in t if k not in ("test_ppl", "best_val_ppl", "params", "train_throughput")]  # ROUGE, ...
    for col in ("model", "test PPL", "PPL / teacher", *task_keys, "size (MiB)", "compression", "train tok/s",
                "wall time (s)"):
        table.add_column(col, justify="right" if col != "model" else "left")
    size = metrics.get("size")
    table.add_row("teacher (FP32)", _fmt(t["test_ppl"]), "1.00", *(_fmt(t.get(k)) for k in task_keys),
                  _fmt(size and size["fp32_mib"]), "1.0x", _fmt(_tokens_per_s(t), ",.0f"),
                  _fmt(wall.get("teacher"), ".1f"))
    if "student" in metrics:
        s = metrics["student"]
        table.add_row(f"student ({c['bits']})", _fmt(s["test_ppl"]), _fmt(metrics["ppl_ratio"]),
                      *(_fmt(s.get(k)) for k in task_keys), _fmt(size["quantized_mib"], ".3f"),
                      f"{size['compression']:.1f}x", _fmt(_tokens_per_s(s), ",.0f"), _fmt(wall.get("student"), ".1f"))
    console.print(table)
    for who, rows in metrics.get("samples", {}).items():
        for r in rows:
            console.print(f"[bold]{who}[/bold] {r['prompt']} [cyan]{r['continuation']}[/cyan]", highlight=False)
    for who, rows in metrics.get("summaries", {}).items():
        for r in rows:
            console.print(f"[bold]{who} summary[/bold] [cyan]{r['summary']}[/cyan] (reference: {r['reference']})",
                          highlight=False)
    console.print(f"total wall time {wall['total']:.1f} s; run dir: {run_dir} (metrics.json, checkpoints/, teacher/)")
