"""Build a publishable folder from a run (adapter) or a merged model: safetensors only, a model card with Hub
metadata, the training recipe and the data provenance; optionally push it with huggingface_hub."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import yaml

from llmtune.atomic import atomic_folder
from llmtune.errors import LlmtuneError
from llmtune.merge import MERGE_MANIFEST

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_COPIED = ("*.safetensors", "*.json", "*.jinja", "recipe.yaml", "tokenizer.model")
_SECRET = re.compile(r"(hf_[A-Za-z0-9]{30,}|sk-[A-Za-z0-9_-]{20,})")
# Builtin models published under the hub id of the model they were imported from.
_HUB_IDS = {"builtin:smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


class PublishError(LlmtuneError, RuntimeError):
    pass


def build_publish_folder(source: Path, output: Path, license: str = "other", repo_id: str | None = None,
                         eval_report: Path | None = None, eval_model: str | None = None) -> Path:
    """`eval_report`: an `llmtune eval` report.json in which this source is one of the models (found by path,
    or named by `eval_model`); its numbers go into the card's model-index and comparison table."""
    source, output = Path(source).resolve(), Path(output).resolve()
    kind = _kind(source)
    recipe = yaml.safe_load((source / "recipe.yaml").read_text())
    manifest = json.loads((source / "manifest.json").read_text()) if (source / "manifest.json").is_file() else {}
    files = sorted({p for pattern in _COPIED for p in source.glob(pattern) if p.is_file()})
    _refuse_unsafe(source, files)
    evaluation = _evaluation(eval_report, source, eval_model) if eval_report is not None else None

    card = model_card(kind, recipe, manifest, license, repo_id, evaluation)
    with atomic_folder(output) as staging:
        for path in files:
            shutil.copy2(path, staging / path.name)
        (staging / "README.md").write_text(card)
    return output


def _kind(source: Path) -> str:
    if not (source / "recipe.yaml").is_file():
        raise PublishError(f"{source}: no recipe.yaml; publish a folder written by llmtune train or merge")
    if (source / "adapter_config.json").is_file():
        return "adapter"
    if (source / MERGE_MANIFEST).is_file() and list(source.glob("*.safetensors")):
        return "merged"
    raise PublishError(f"{source}: neither an adapter run nor a merged model")


def _refuse_unsafe(source: Path, files: list[Path]) -> None:
    pickles = sorted(p.name for p in source.iterdir() if p.is_file() and p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise PublishError(f"{source}: refusing to publish pickle files: {', '.join(pickles)}")
    secrets = [v for k, v in os.environ.items() if re.search(r"TOKEN|API_KEY|SECRET", k) and len(v) >= 8]
    for path in files:
        if path.suffix == ".safetensors":
            continue
        text = path.read_text(errors="replace")
        if _SECRET.search(text) or any(secret in text for secret in secrets):
            raise PublishError(f"{path}: looks like it contains a secret; refusing to publish")


def _evaluation(report_path: Path, source: Path, model: str | None) -> tuple[dict[str, Any], str]:
    """(report, the name this source has in it)."""
    try:
        report = json.loads(Path(report_path).read_text())
        names = {m["name"]: Path(m["path"]).resolve() for m in report["models"]}
        missing = [key for key in ("results", "comparisons", "baseline", "tasks") if key not in report]
        if missing:
            raise KeyError(", ".join(missing))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PublishError(f"{report_path}: not an llmtune eval report ({type(err).__name__}: {err})") from None
    if model is None:
        model = next((name for name, path in names.items() if path == source), None)
        if model is None:
            raise PublishError(f"{report_path}: none of its models ({', '.join(names)}) is {source}; "
                               "name one with --eval-model")
    elif model not in names:
        raise PublishError(f"--eval-model {model!r}: the report has {', '.join(names)}")
    return report, model


def _eval_results(report: dict[str, Any], model: str) -> list[Any]:
    from huggingface_hub import EvalResult

    task_types = {"mcq": "multiple-choice", "generative": "text-generation", "judge": "text-generation",
                  "rules": "text-generation", "classification": "text-classification"}
    return [
        EvalResult(task_type=task_types[task["kind"]], task_name=task["name"], dataset_type="json",
                   dataset_name=f"{task['name']} ({Path(task['file']).name}, sha256 {task['sha256'][:16]})",
                   metric_type=metric, metric_name=metric, metric_value=round(value, 4))
        for task in report["tasks"]
        for metric, value in _headline_metrics(report["results"][task["name"]][model]).items()
    ]


def _headline_metrics(result: dict[str, Any]) -> dict[str, float]:
    """Each metric's mean, and a classification task's macro F1."""
    metrics = {metric: value["mean"] for metric, value in result["metrics"].items()}
    if result.get("classification"):
        metrics["f1_macro"] = result["classification"]["f1_macro"]
    return metrics


def _comparison_table(report: dict[str, Any], model: str) -> str:
    baseline = report["baseline"]
    confidence = round(report.get("confidence", 0.95) * 100)
    lines = [f"`{model}` against `{baseline}` on the same items; {confidence}% bootstrap intervals; p from "
             "McNemar's exact test (right/wrong metrics) or a paired bootstrap (scores).", "",
             f"| task | metric | {baseline} | {model} | difference | p |", "|---|---|---|---|---|---|"]
    for task in report["tasks"]:
        results = report["results"][task["name"]]
        compared = {c["metric"]: c for c in report["comparisons"].get(task["name"], {}).get(model, [])}
        for metric, value in results[model]["metrics"].items():
            base = results[baseline]["metrics"][metric]
            c = compared.get(metric)
            difference = f"{c['difference']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]" if c else "—"
            p_value = f"{c['p_value']:.3g}" if c else "—"
            lines.append(f"| {task['name']} | {metric} | {base['mean']:.3f} [{base['low']:.3f}, {base['high']:.3f}] "
                         f"| {value['mean']:.3f} [{value['low']:.3f}, {value['high']:.3f}] | {difference} | "
                         f"{p_value} |")
    return "\n".join(lines)


def _synth_provenance(sources: list[dict[str, Any]]) -> str:
    """For training files written by `llmtune synth`: methods, counts and the decontamination summary."""
    lines = []
    for source in sources:
        report_path = Path(source.get("path", "")).parent / "report.json"
        if not report_path.is_file():
            continue
        report = json.loads(report_path.read_text())
        if "decontamination" not in report:
            continue
        kept = report["kept"]
        eval_sets = ", ".join(Path(e["file"]).name for e in report["decontamination"]["eval_sets"]) or "none"
        lines.append(
            f"- `{Path(source['path']).name}` was synthesized by `llmtune synth`: generated "
            f"{', '.join(f'{m} {n}' for m, n in report['generated'].items())}; kept {kept['sft']} SFT rows and "
            f"{kept['preferences']} preference pairs; removed by filters: "
            f"{', '.join(f'{k} {v}' for k, v in report['removed_by_filter'].items()) or 'none'}; "
            f"decontaminated against {eval_sets} ({report['decontamination']['ngram']}-gram, exact and fuzzy "
            f"match): {report['decontaminated']} removed."
        )
    return "\n".join(lines)


def model_card(kind: str, recipe: dict[str, Any], manifest: dict[str, Any], license: str,
               repo_id: str | None, evaluation: tuple[dict[str, Any], str] | None = None) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    base = recipe["model"]["name_or_path"]
    sources = manifest.get("data", {}).get("sources", [])
    data = manifest.get("data", {})
    clinical = any("clinical" in str(s.get("path", "")) for s in sources) or "clinical" in str(recipe)
    labels = (recipe.get("classification") or {}).get("labels") if recipe.get("task") == "classification" else None
    card_data = ModelCardData(
        base_model=_HUB_IDS.get(base, base if not base.startswith(("builtin:", "/")) else None),
        library_name="peft" if kind == "adapter" else "transformers",
        license=license,
        tags=["llmtune", recipe.get("method", "sft"), "lora" if kind == "adapter" else "merged"]
        + (["medical", "clinical-qa"] if clinical else []) + (["text-classification"] if labels else []),
        pipeline_tag="text-classification" if labels else "text-generation",
        datasets=sorted({Path(s["path"]).name for s in sources if "path" in s}) or None,
        model_name=(repo_id or "llmtune-model") if evaluation else None,
        eval_results=_eval_results(*evaluation) if evaluation else None,
    )
    synthesized = _synth_provenance(sources)
    rows = "\n".join(
        f"| `{Path(s['path']).name}` | {s.get('sha256', 'hub')[:16]} |" for s in sources if "path" in s
    )
    limitations = (
        "This model is **not a medical device** and must not be used for diagnosis or treatment decisions "
        "without a qualified clinician. It was trained on a small set of reference facts and can be wrong, "
        "outdated or incomplete; verify every answer against current clinical guidance."
        if clinical else
        "Fine-tuned on a small, specific dataset: expect errors outside that domain, and evaluate before use."
    )
    load = _classifier_load(card_data.base_model, repo_id, labels) if labels and kind == "adapter" else (
        "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"base = AutoModelForCausalLM.from_pretrained({card_data.base_model or '<base model>'!r})\n"
        f"model = PeftModel.from_pretrained(base, {repo_id or '<this folder>'!r})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({repo_id or '<this folder>'!r})"
        if kind == "adapter" else
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained({repo_id or '<this folder>'!r})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({repo_id or '<this folder>'!r})"
    )
    train = manifest.get("train", {})
    content = f"""---
{card_data.to_yaml()}
---

# {repo_id or 'llmtune model'}

A {'LoRA adapter' if kind == 'adapter' else 'merged model'} for `{base}` trained with
[llmtune](https://pypi.org/project/llmtune/) by `{recipe.get('method', 'sft')}`.{_classifier_note(labels)}

## Intended use and limitations

{limitations}

## How to load

```python
{load}
```

## Training

- method: `{recipe.get('method', 'sft')}`, steps: {train.get('steps', 'n/a')}
- final training loss: {train.get('final_loss', 'n/a')}
- libraries: {', '.join(f'{k} {v}' for k, v in manifest.get('libraries', {}).items()) or 'n/a'}

```yaml
{yaml.safe_dump(recipe, sort_keys=False).strip()}
```

## Data provenance

| file | sha256 (first 16) |
|---|---|
{rows or '| n/a | |'}

Rows kept for training: {data.get('train', {}).get('rows', 'n/a')};
held out: {data.get('validation', {}).get('rows', 0)};
skipped while loading: {sum(v.get('rows_skipped', 0) for v in data.get('loaded', {}).values())}.
{chr(10) + synthesized + chr(10) if synthesized else ''}
## Evaluation

{_comparison_table(*evaluation) if evaluation else 'No evaluation report was attached to this run.'}
"""
    ModelCard(content)  # parses the metadata block: fail here, not on the Hub
    return content


def _classifier_note(labels: list[str] | None) -> str:
    if not labels:
        return ""
    return ("\n\nA **sequence classifier**: a new head over the base model predicts one of "
            f"{', '.join(f'`{label}`' for label in labels)} for each text. The head (`score`) is trained in full "
            "and saved in `adapter_model.safetensors` with the LoRA weights (PEFT `modules_to_save`).")


def _classifier_load(base: str | None, repo_id: str | None, labels: list[str]) -> str:
    """Loading code for a classification adapter: the base as a classifier over the same labels, then PEFT puts
    the trained head and LoRA weights on it."""
    folder = repo_id or "<this folder>"
    return (
        "from peft import PeftModel\nfrom transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        f"labels = {labels!r}\n"
        f"tokenizer = AutoTokenizer.from_pretrained({folder!r})\n"
        f"base = AutoModelForSequenceClassification.from_pretrained({base or '<base model>'!r}, "
        "num_labels=len(labels),\n    id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)},"
        "\n    pad_token_id=tokenizer.pad_token_id)\n"
        f"model = PeftModel.from_pretrained(base, {folder!r})\n"
        "print(labels[model(**tokenizer(\"...\", return_tensors=\"pt\")).logits.argmax(-1).item()])"
    )


def push_folder(folder: Path, repo_id: str, private: bool) -> str:
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if not token:
        raise PublishError("--push needs a Hugging Face token in the environment: set HF_TOKEN")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        commit = api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                                   commit_message="Upload from llmtune publish")
    except Exception as err:  # the hub client raises many types; the user needs the repo and the reason
        raise PublishError(f"push to {repo_id} failed: {type(err).__name__}: {_redact(str(err), token)}") from None
    return str(getattr(commit, "commit_url", commit))


def _redact(text: str, token: str) -> str:
    return text.replace(token, "***")
