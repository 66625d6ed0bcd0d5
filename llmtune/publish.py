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


def build_publish_folder(source: Path, output: Path, license: str = "other", repo_id: str | None = None) -> Path:
    source, output = Path(source).resolve(), Path(output).resolve()
    kind = _kind(source)
    recipe = yaml.safe_load((source / "recipe.yaml").read_text())
    manifest = json.loads((source / "manifest.json").read_text()) if (source / "manifest.json").is_file() else {}
    files = sorted({p for pattern in _COPIED for p in source.glob(pattern) if p.is_file()})
    _refuse_unsafe(source, files)

    card = model_card(kind, recipe, manifest, license, repo_id)
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


def model_card(kind: str, recipe: dict[str, Any], manifest: dict[str, Any], license: str,
               repo_id: str | None) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    base = recipe["model"]["name_or_path"]
    sources = manifest.get("data", {}).get("sources", [])
    data = manifest.get("data", {})
    clinical = any("clinical" in str(s.get("path", "")) for s in sources) or "clinical" in str(recipe)
    card_data = ModelCardData(
        base_model=_HUB_IDS.get(base, base if not base.startswith(("builtin:", "/")) else None),
        library_name="peft" if kind == "adapter" else "transformers",
        license=license,
        tags=["llmtune", recipe.get("method", "sft"), "lora" if kind == "adapter" else "merged"]
        + (["medical", "clinical-qa"] if clinical else []),
        pipeline_tag="text-generation",
        datasets=sorted({Path(s["path"]).name for s in sources if "path" in s}) or None,
    )
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
    load = (
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
[llmtune](https://pypi.org/project/llmtune/) by `{recipe.get('method', 'sft')}`.

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

## Evaluation

No evaluation report was attached to this run.
"""
    ModelCard(content)  # parses the metadata block: fail here, not on the Hub
    return content


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
