"""What `llmtune run` remembers between runs: per stage, the fingerprint of its inputs and a digest of its outputs.

A stage's fingerprint covers its section as derived (upstream paths included), the base model section, the
llmtune version, the content of the input files its section names, and the output digests of the stages it
reads. Equal fingerprint and intact outputs: the stage is skipped.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from llmtune import __version__
from llmtune.atomic import write_atomic
from llmtune.hashing import file_sha256

STATE_FILE = "pipeline-state.json"
# Files bigger than this (model weights) are identified by size and modification time, not read whole.
_HASH_LIMIT = 32 << 20

# Which files of a stage's folder are its output (checkpoints, logs and journals are not).
OUTPUT_FILES = {
    "synth": ("sft.jsonl", "preferences.jsonl"),
    "prefs": ("preferences.jsonl",),
    "sft": ("adapter_model.safetensors", "adapter_config.json"),
    "dpo": ("adapter_model.safetensors", "adapter_config.json"),
    "eval": ("report.json",),
    "merge": ("*.safetensors", "config.json"),
    "publish": ("*",),
}
# The stages whose outputs a stage reads.
UPSTREAM = {
    "synth": (),
    "sft": ("synth",),
    "prefs": ("synth", "sft"),
    "dpo": ("sft", "prefs"),
    "eval": ("sft", "dpo"),
    "merge": ("sft", "dpo"),
    "publish": ("merge", "sft", "dpo", "eval"),
}


class PipelineState:
    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / STATE_FILE
        self.stages: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            self.stages = json.loads(self.path.read_text()).get("stages", {})

    def get(self, stage: str) -> dict[str, Any]:
        return self.stages.get(stage, {})

    def set(self, stage: str, **record: Any) -> None:
        self.stages[stage] = record
        write_atomic(self.path, json.dumps({"llmtune": __version__, "stages": self.stages}, indent=2) + "\n")


def fingerprint(stage: str, section: dict[str, Any], model: dict[str, Any], folder: Path, output_dir: Path,
                upstream: dict[str, str]) -> str:
    payload = {"stage": stage, "section": section, "model": model, "llmtune": __version__, "upstream": upstream,
               "inputs": input_hashes([section, model], folder, output_dir)}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def input_hashes(node: Any, folder: Path, output_dir: Path) -> dict[str, str]:
    """Content hashes of the files and folders a section names (relative to the recipe), outside the pipeline's
    own output folder (those are covered by upstream digests)."""
    found: dict[str, str] = {}
    for value in _strings(node):
        if not value or "\n" in value or len(value) > 4096:
            continue
        try:
            path = (folder / value).resolve()
            exists = path.exists()
        except OSError:
            continue
        if not exists or path == folder.resolve() or path.is_relative_to(output_dir):
            continue
        found[value] = _tree_hash(path)
    return found


def output_digest(stage: str, folder: Path) -> str | None:
    """A digest of the stage's outputs, or None when they are missing (the stage must run again)."""
    files = sorted({p for pattern in OUTPUT_FILES[stage] for p in folder.glob(pattern) if p.is_file()})
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{_file_hash(path)}\n".encode())
    return digest.hexdigest()


def _strings(node: Any):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list | tuple):
        for value in node:
            yield from _strings(value)


def _tree_hash(path: Path) -> str:
    if path.is_file():
        return _file_hash(path)
    digest = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{child.relative_to(path)}\0{_file_hash(child)}\n".encode())
    return digest.hexdigest()


def _file_hash(path: Path) -> str:
    stat = path.stat()
    if stat.st_size > _HASH_LIMIT:
        return f"size={stat.st_size},mtime={stat.st_mtime_ns}"
    return file_sha256(path)
