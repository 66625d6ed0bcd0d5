"""The stage table `llmtune run` prints as stages start and finish, and its closing summary."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from llmtune.pipeline.run import StageOutcome

_STYLE = {"done": "green", "skipped": "dim", "failed": "red", "running": "yellow", "pending": "dim"}


def stage_table(stages: list[str], outcomes: list[StageOutcome], running: str | None) -> Table:
    by_stage = {o.stage: o for o in outcomes}
    table = Table(title="llmtune run", show_header=True)
    for column, justify in (("stage", "left"), ("status", "left"), ("wall", "right"), ("rows", "right"),
                            ("tokens/s", "right"), ("notes", "left")):
        table.add_column(column, justify=justify)
    for stage in stages:
        outcome = by_stage.get(stage)
        status = "running" if stage == running else outcome.status if outcome else "pending"
        summary = outcome.summary if outcome else {}
        wall = f"{outcome.wall_s:.0f} s" if outcome and outcome.wall_s else ""
        rows = summary.get("rows")
        speed = summary.get("tokens_per_s")
        table.add_row(stage, f"[{_STYLE[status]}]{status}[/]", wall, "" if rows is None else str(rows),
                      "" if speed is None else f"{speed:.0f}", _notes(summary))
    total = sum(o.wall_s for o in outcomes if o.status == "done")
    table.caption = f"ran {total:.0f} s this time" if total else None
    return table


def delta_lines(outcomes: list[StageOutcome]) -> list[str]:
    lines = []
    for outcome in outcomes:
        for name, d in outcome.summary.get("deltas", {}).items():
            lines.append(f"{name:<34} {d['metric']} {d['baseline']:.3f} -> {d['value']:.3f} "
                         f"({d['difference']:+.3f}, p={d['p_value']:.2g})")
    return lines


def _notes(summary: dict[str, Any]) -> str:
    notes = []
    if summary.get("final_loss") is not None:
        notes.append(f"loss {summary['final_loss']:.3f}")
    if summary.get("decontaminated") is not None:
        notes.append(f"decontaminated {summary['decontaminated']}, filtered {summary.get('removed', 0)}")
    if summary.get("max_logit_difference") is not None:
        notes.append(f"{summary['run']}: max logit diff {summary['max_logit_difference']:.1e}")
    if summary.get("deltas"):
        notes.append(f"{len(summary['deltas'])} comparisons (below)")
    if summary.get("pushed"):
        notes.append(f"pushed {summary['pushed']}")
    return "; ".join(notes)
