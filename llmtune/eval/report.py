"""The evaluation report: report.json (schema: `EvalReport`, exported to llmtune/eval/report.schema.json),
report.md, and a self-contained report.html with the plots embedded (also saved under plots/)."""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from llmtune import __version__
from llmtune.atomic import write_atomic
from llmtune.eval.recipe import EvalSection
from llmtune.eval.stats import bootstrap_ci, mcnemar_exact, paired_bootstrap
from llmtune.hashing import file_sha256

SCHEMA_VERSION = "llmtune.eval.report/1"


class Estimate(BaseModel):
    mean: float
    low: float
    high: float


class Comparison(BaseModel):
    metric: str
    difference: float  # candidate - baseline
    low: float
    high: float
    p_value: float
    test: Literal["mcnemar_exact", "paired_bootstrap"]
    only_candidate_right: int | None = None
    only_baseline_right: int | None = None


class ClassificationSummary(BaseModel):
    labels: list[str]  # the order of the confusion matrix's rows and columns
    f1_macro: float
    f1_per_label: dict[str, float]
    confusion_matrix: list[list[int]]  # [true label][predicted label] counts


class Result(BaseModel):
    items: int
    metrics: dict[str, Estimate]
    by_category: dict[str, dict[str, Estimate]]
    category_items: dict[str, int]
    classification: ClassificationSummary | None = None  # classification tasks


class TaskInfo(BaseModel):
    name: str
    kind: Literal["mcq", "generative", "judge", "classification", "rules"]
    file: str
    sha256: str
    items: int
    prompt: Literal["chat", "plain"]
    primary_metric: str


class ModelInfo(BaseModel):
    name: str
    path: str
    loss_curve: list[dict[str, float]] = []  # from a trained run's manifest.json


class EvalReport(BaseModel):
    schema_version: Literal["llmtune.eval.report/1"]
    llmtune_version: str
    created: str
    baseline: str
    confidence: float
    bootstrap_resamples: int
    models: list[ModelInfo]
    tasks: list[TaskInfo]
    results: dict[str, dict[str, Result]]  # task -> model -> result
    comparisons: dict[str, dict[str, list[Comparison]]]  # task -> candidate model -> one per metric
    # lm-eval's own results when `--harness` ran: model -> lm-eval task -> metric -> value
    harness: dict[str, dict[str, dict[str, float]]] = {}


def build_report(section: EvalSection, items: dict[str, list[Any]],
                 results: dict[str, dict[str, list[dict[str, Any]]]],
                 harness: dict[str, Any] | None = None) -> dict[str, Any]:
    from llmtune.eval.run import METRICS

    def estimate(values: list[float], salt: int) -> Estimate:
        ci = bootstrap_ci(values, section.bootstrap, section.confidence, section.seed + salt)
        return Estimate(mean=ci.mean, low=ci.low, high=ci.high)

    tasks, table, comparisons = [], {}, {}
    for task in section.tasks:
        metrics = METRICS[task.kind]
        tasks.append(TaskInfo(name=task.name, kind=task.kind, file=str(task.path), sha256=file_sha256(task.path),
                              items=len(items[task.name]), prompt=task.prompt, primary_metric=metrics[0]))
        table[task.name], comparisons[task.name] = {}, {}
        for model_name, rows in results[task.name].items():
            categories = sorted({r["category"] for r in rows})
            table[task.name][model_name] = Result(
                items=len(rows),
                metrics={m: estimate([r[m] for r in rows], i) for i, m in enumerate(metrics)},
                by_category={c: {m: estimate([r[m] for r in rows if r["category"] == c], i)
                                 for i, m in enumerate(metrics)} for c in categories},
                category_items={c: sum(r["category"] == c for r in rows) for c in categories},
                classification=_classification(rows) if task.kind == "classification" else None,
            )
        baseline = results[task.name][section.baseline_name]
        for model_name, rows in results[task.name].items():
            if model_name == section.baseline_name:
                continue
            comparisons[task.name][model_name] = [
                _compare(metric, [r[metric] for r in baseline], [r[metric] for r in rows], section)
                for metric in metrics
            ]
    report = EvalReport(
        schema_version=SCHEMA_VERSION, llmtune_version=__version__,
        created=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), baseline=section.baseline_name,
        confidence=section.confidence, bootstrap_resamples=section.bootstrap,
        models=[ModelInfo(name=m.name, path=m.path, loss_curve=_loss_curve(Path(m.path))) for m in section.models],
        tasks=tasks, results=table, comparisons=comparisons,
        harness={model: output["results"] for model, output in (harness or {}).items()},
    )
    return report.model_dump(mode="json")


def _compare(metric: str, baseline: list[float], candidate: list[float], section: EvalSection) -> Comparison:
    from llmtune.eval.run import BINARY

    paired = paired_bootstrap(baseline, candidate, section.bootstrap, section.confidence, section.seed)
    if metric in BINARY:
        test = mcnemar_exact(baseline, candidate)
        return Comparison(metric=metric, difference=paired["difference"], low=paired["low"], high=paired["high"],
                          p_value=test["p_value"], test="mcnemar_exact",
                          only_candidate_right=test["only_candidate_right"],
                          only_baseline_right=test["only_baseline_right"])
    return Comparison(metric=metric, test="paired_bootstrap", **paired)


def _classification(rows: list[dict[str, Any]]) -> ClassificationSummary:
    from llmtune.eval.classification import summarize

    return ClassificationSummary(**summarize(rows))


def _loss_curve(path: Path) -> list[dict[str, float]]:
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return []
    log = json.loads(manifest.read_text()).get("train", {}).get("log", [])
    return [{"step": float(e["step"]), "loss": float(e["loss"])} for e in log if "loss" in e and "step" in e]


# ------------------------------------------------------------------------------------------------ writing


def write_report(out: Path, report: dict[str, Any], section: EvalSection) -> None:
    plots = _plots(report)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    for name, png in plots.items():
        write_atomic(out / "plots" / f"{name}.png", png)
    write_atomic(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    write_atomic(out / "report.md", _markdown(report, plots).encode())
    write_atomic(out / "report.html", _html(report, plots).encode())


def _plots(report: dict[str, Any]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots: dict[str, bytes] = {}
    models = [m["name"] for m in report["models"]]
    for task in report["tasks"]:
        metric, results = task["primary_metric"], report["results"][task["name"]]
        figure, axis = plt.subplots(figsize=(5.5, 3.2))
        means = [results[m]["metrics"][metric]["mean"] for m in models]
        errors = [[means[i] - results[m]["metrics"][metric]["low"] for i, m in enumerate(models)],
                  [results[m]["metrics"][metric]["high"] - means[i] for i, m in enumerate(models)]]
        axis.bar(models, means, yerr=errors, capsize=6, color="#4C72B0")
        axis.set_ylim(0, 1)
        axis.set_ylabel(metric)
        axis.set_title(f"{task['name']}: {metric} with {round(report['confidence'] * 100)}% CI")
        plots[f"{task['name']}-{metric}"] = _png(figure)
        categories = sorted({c for m in models for c in results[m]["by_category"]})
        if len(categories) > 1:
            figure, axis = plt.subplots(figsize=(max(5.5, 1.1 * len(categories)), 3.4))
            width = 0.8 / len(models)
            for index, model in enumerate(models):
                values = [results[model]["by_category"].get(c, {}).get(metric, {}).get("mean", 0.0)
                          for c in categories]
                axis.bar([i + index * width for i in range(len(categories))], values, width, label=model)
            axis.set_xticks([i + 0.4 - width / 2 for i in range(len(categories))], categories, rotation=30,
                            ha="right")
            axis.set_ylim(0, 1)
            axis.set_ylabel(metric)
            axis.set_title(f"{task['name']}: {metric} per category")
            axis.legend(fontsize=8)
            figure.tight_layout()
            plots[f"{task['name']}-categories"] = _png(figure)
    for title, summary in _confusions(report):
        plots[f"{title.replace(' · ', '-')}-confusion"] = _confusion_plot(title, summary)
    curves = [m for m in report["models"] if m["loss_curve"]]
    if curves:
        figure, axis = plt.subplots(figsize=(5.5, 3.2))
        for model in curves:
            axis.plot([p["step"] for p in model["loss_curve"]], [p["loss"] for p in model["loss_curve"]],
                      label=model["name"])
        axis.set_xlabel("step")
        axis.set_ylabel("training loss")
        axis.set_title("training loss")
        axis.legend(fontsize=8)
        plots["training-loss"] = _png(figure)
    return plots


def _confusion_plot(title: str, summary: dict[str, Any]) -> bytes:
    import matplotlib.pyplot as plt

    labels, matrix = summary["labels"], summary["confusion_matrix"]
    size = max(3.2, 0.7 * len(labels) + 1.8)
    figure, axis = plt.subplots(figsize=(size + 0.6, size))
    axis.imshow(matrix, cmap="Blues")
    dark = max(map(max, matrix)) / 2  # white numbers on the darker cells
    for row, counts in enumerate(matrix):
        for column, count in enumerate(counts):
            axis.text(column, row, str(count), ha="center", va="center", fontsize=9,
                      color="white" if count > dark else "black")
    axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    axis.set_yticks(range(len(labels)), labels)
    axis.set_xlabel("predicted")
    axis.set_ylabel("true")
    axis.set_title(f"{title} (macro F1 {summary['f1_macro']:.3f})", fontsize=9)
    return _png(figure)


def _confusions(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """("task · model", classification summary) for each classification result."""
    return [(f"{task['name']} · {model['name']}", summary) for task in report["tasks"] for model in report["models"]
            if (summary := report["results"][task["name"]][model["name"]].get("classification"))]


def _confusion_table(summary: dict[str, Any]) -> list[list[str]]:
    """Header row, then one row per true label: the label and its counts per predicted label."""
    return [["true \\ predicted", *summary["labels"]],
            *[[label, *map(str, counts)] for label, counts in zip(summary["labels"], summary["confusion_matrix"],
                                                                  strict=True)]]


def _png(figure) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def _rows(report: dict[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(task, model, metric, value with CI, vs baseline) for the tables."""
    rows = []
    for task in report["tasks"]:
        for model in report["models"]:
            result = report["results"][task["name"]][model["name"]]
            compared = {c["metric"]: c for c in report["comparisons"][task["name"]].get(model["name"], [])}
            for metric, value in result["metrics"].items():
                ci = f"{value['mean']:.3f} [{value['low']:.3f}, {value['high']:.3f}]"
                delta = "baseline" if model["name"] == report["baseline"] else "—"
                if metric in compared:
                    c = compared[metric]
                    delta = f"{c['difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}], p={c['p_value']:.3g}"
                rows.append((task["name"], model["name"], metric, ci, delta))
            if result.get("classification"):  # macro F1 is not a mean over items: no CI, no paired test
                rows.append((task["name"], model["name"], "f1_macro", f"{result['classification']['f1_macro']:.3f}",
                             "—"))
    return rows


def _markdown(report: dict[str, Any], plots: dict[str, bytes]) -> str:
    confidence = round(report["confidence"] * 100)
    lines = ["# Evaluation report", "", f"Baseline: `{report['baseline']}`. Means with {confidence}% bootstrap "
             f"CIs ({report['bootstrap_resamples']} resamples); differences vs the baseline with McNemar's exact "
             "test (right/wrong metrics) or a paired bootstrap (scores).", "",
             "| task | model | metric | value | vs baseline |", "|---|---|---|---|---|"]
    lines += [f"| {t} | {m} | {k} | {v} | {d} |" for t, m, k, v, d in _rows(report)]
    lines += ["", "## Data", ""]
    lines += [f"- `{t['name']}` ({t['kind']}, {t['items']} items): `{t['file']}` sha256 `{t['sha256'][:16]}`"
              for t in report["tasks"]]
    for title, summary in _confusions(report):
        table = _confusion_table(summary)
        lines += ["", f"## Confusion matrix: {title}", "", f"Macro F1 {summary['f1_macro']:.3f}; rows are the true "
                  "labels, columns the predicted ones.", "", "| " + " | ".join(table[0]) + " |",
                  "|" + "---|" * len(table[0])]
        lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    if report["harness"]:
        lines += ["", "## lm-evaluation-harness", "", "| model | task | metric | value |", "|---|---|---|---|"]
        lines += [f"| {model} | {task} | {metric} | {value:.4g} |" for model, tasks in report["harness"].items()
                  for task, metrics in tasks.items() for metric, value in metrics.items()]
    lines += ["", "## Plots", ""] + [f"![{name}](plots/{name}.png)" for name in plots]
    return "\n".join(lines) + "\n"


def _html(report: dict[str, Any], plots: dict[str, bytes]) -> str:
    rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in _rows(report))
    images = "".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
        f"<figcaption>{html.escape(name)}</figcaption></figure>" for name, png in plots.items()
    )
    confusions = "".join(
        f"<h3>{html.escape(title)}: macro F1 {summary['f1_macro']:.3f}</h3><table>"
        + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                  for row in _confusion_table(summary)) + "</table>"
        for title, summary in _confusions(report))
    confusions = f"<h2>Confusion matrices (rows: true, columns: predicted)</h2>{confusions}" if confusions else ""
    data = "".join(f"<li><code>{html.escape(t['name'])}</code>: {html.escape(t['file'])} "
                   f"(sha256 {t['sha256'][:16]}, {t['items']} items)</li>" for t in report["tasks"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>llmtune evaluation</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px}}figure{{display:inline-block;margin:1em}}</style></head>
<body><h1>Evaluation report</h1>
<p>Baseline: <code>{html.escape(report['baseline'])}</code>; {round(report['confidence'] * 100)}% bootstrap CIs;
created {html.escape(report['created'])} by llmtune {html.escape(report['llmtune_version'])}.</p>
<table><tr><th>task</th><th>model</th><th>metric</th><th>value</th><th>vs baseline</th></tr>{rows}</table>
{confusions}<h2>Plots</h2>{images}<h2>Data</h2><ul>{data}</ul></body></html>
"""
