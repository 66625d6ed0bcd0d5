"""`llmtune synth`: run the recipe's methods, validate, filter and decontaminate, write the data and a report.

The output folder holds:
- journal.jsonl       every generated item as it finished (accepted or rejected); a rerun skips ids found here
- sft.jsonl           accepted chat examples (messages + provenance), ready for `data.train`
- preferences.jsonl   accepted chosen/rejected pairs (when a preferences method ran)
- rejects.jsonl       everything not kept, with the stage (teacher, validation, filter:*, decontamination)
- report.json         counts per method and filter, decontamination matches, tokens, time, input hashes
Everything but the journal is rewritten atomically at the end, so changing only filters or eval sets and
rerunning refilters without asking the teacher again.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmtune.atomic import write_atomic
from llmtune.errors import LlmtuneError
from llmtune.hashing import file_sha256
from llmtune.journal import Journal
from llmtune.synth.context import Context
from llmtune.synth.decontam import EvalIndex
from llmtune.synth.filters import apply_filters
from llmtune.synth.methods.doc_qa import doc_qa
from llmtune.synth.methods.evol import evol
from llmtune.synth.methods.facts import fact_contrasts, fact_items
from llmtune.synth.methods.preferences import preference_pairs, sources_from_file, sources_from_records
from llmtune.synth.methods.self_instruct import read_seed_tasks, self_instruct
from llmtune.synth.prompts import PROMPTS_DIR
from llmtune.synth.recipe import PAIR_METHODS, SynthSection, TeacherSection
from llmtune.synth.records import Record
from llmtune.synth.teachers import Teacher, make_teacher

log = logging.getLogger("llmtune.synth")
JOURNAL, STATE = "journal.jsonl", "synth-state.json"


class SynthError(LlmtuneError, RuntimeError):
    pass


@dataclass
class Outcome:
    sft: list[Record] = field(default_factory=list)
    preferences: list[Record] = field(default_factory=list)
    rejects: list[Record] = field(default_factory=list)
    filter_counts: Counter[str] = field(default_factory=Counter)
    matches: list[dict[str, Any]] = field(default_factory=list)
    generated: list[Record] = field(default_factory=list)  # everything the methods produced, in plan order


def synthesize(section: SynthSection, overwrite: bool = False, progress: Any = None) -> dict[str, Any]:
    """Run the synthesis; returns the report (also written to report.json)."""
    out = section.output_dir
    fingerprint = generation_fingerprint(section)
    _claim(out, fingerprint, overwrite)
    journal = Journal(out / JOURNAL)
    resumed = len(journal.records)
    if resumed:
        log.info("resuming: %d items already generated in %s", resumed, out / JOURNAL)
    started = time.perf_counter()
    try:
        outcome = asyncio.run(_run(section, journal, progress))
    finally:
        journal.close()
    wall = time.perf_counter() - started
    report = _report(section, outcome, wall, len(journal.records) - resumed, fingerprint)
    _write_outputs(out, outcome, report, any(m.kind in PAIR_METHODS for m in section.methods))
    return report


async def _run(section: SynthSection, journal: Journal, progress: Any) -> Outcome:
    teachers: dict[str, Teacher] = {}

    def teacher_for(spec: TeacherSection) -> Teacher:
        key = spec.model_dump_json()
        if key not in teachers:
            teachers[key] = make_teacher(spec)
        return teachers[key]

    context = Context(section.seed, journal, None, on_start=getattr(progress, "start", None),
                      advance=getattr(progress, "advance", lambda n: None))
    outcome = Outcome()
    eval_index = EvalIndex(section.decontaminate)  # read once, checked for SFT items and for pairs
    seeds: list[tuple[str, str]] = []
    try:
        for method in section.methods:
            if method.kind == "fact_templates":
                outcome.generated += fact_items(method, section.seed)
            elif method.kind == "self_instruct":
                seeds = read_seed_tasks(method.seeds)
                outcome.generated += await self_instruct(method, context, teacher_for(section.teacher))
            elif method.kind == "evol":
                teacher = teacher_for(section.teacher)
                outcome.generated += await evol(method, context, teacher, outcome.generated, seeds)
            elif method.kind == "doc_qa":
                outcome.generated += await doc_qa(method, context, teacher_for(section.teacher))
        _finish_sft(section, outcome, seeds, eval_index)
        for method in section.methods:
            if method.kind == "fact_contrasts":
                system = _system_turns(section)  # contrast pairs ask as the SFT items do
                pairs = [{**r, "prompt": [*system, *r["prompt"]]} if r["status"] == "ok" else r
                         for r in fact_contrasts(method, section.seed)]
                outcome.generated += pairs
                _finish_preferences(outcome, pairs, eval_index)
        for method in section.methods:
            if method.kind != "preferences":
                continue
            from_sft = method.prompts == "sft"
            sources = sources_from_records(outcome.sft) if from_sft else sources_from_file(Path(method.prompts))
            policy = teacher_for(method.policy or section.teacher)
            judge = teacher_for(section.teacher) if method.judge == "rubric" else None
            pairs = await preference_pairs(method, context, policy, judge, sources)
            outcome.generated += pairs
            _finish_preferences(outcome, pairs, eval_index)
    finally:
        for teacher in teachers.values():
            await teacher.close()
    return outcome


def _finish_sft(section: SynthSection, outcome: Outcome, seeds: list[tuple[str, str]], eval_index: EvalIndex
                ) -> None:
    candidates = [r for r in outcome.generated if r["status"] == "ok"]
    outcome.rejects += [r for r in outcome.generated if r["status"] != "ok"]
    filtered = apply_filters(candidates, section.filters, [text for _, text in seeds])
    outcome.filter_counts.update(filtered.counts)
    outcome.rejects += filtered.removed
    clean = eval_index.check(filtered.kept)
    outcome.rejects += clean.removed
    outcome.matches += clean.matches
    system = _system_turns(section)
    outcome.sft = [{**r, "messages": [*system, *r["messages"]]} for r in clean.kept]


def _system_turns(section: SynthSection) -> list[dict[str, str]]:
    """What every synthesized conversation starts with: the run's system prompt, if it has one."""
    return [{"role": "system", "content": section.system_prompt}] if section.system_prompt else []


def _finish_preferences(outcome: Outcome, pairs: list[Record], eval_index: EvalIndex) -> None:
    outcome.rejects += [r for r in pairs if r["status"] != "ok"]
    clean = eval_index.check([r for r in pairs if r["status"] == "ok"])
    outcome.rejects += clean.removed
    outcome.matches += clean.matches
    outcome.preferences += clean.kept


# ------------------------------------------------------------------------------------------ state and outputs


WEIGHT_SUFFIXES = {".safetensors", ".gguf", ".bin", ".jinja"}


def generation_fingerprint(section: SynthSection) -> str:
    """What the journal's items depend on: seed, teachers, methods, their input files and the prompt templates.
    Filters, decontamination and the system prompt are applied afterwards and may change freely."""
    described = {
        "seed": section.seed,
        "teacher": _teacher_identity(section.teacher),
        "methods": [_method_identity(m) for m in section.methods],
        "prompts": {p.name: file_sha256(p) for p in sorted(PROMPTS_DIR.glob("*.jinja"))},
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _teacher_identity(teacher: TeacherSection | None) -> dict[str, Any] | None:
    if teacher is None:
        return None
    # How fast and how patiently we ask does not change what is written.
    described = teacher.model_dump(mode="json", exclude={"max_concurrency", "timeout_s", "max_retries", "base_url"})
    if teacher.kind == "local" and teacher.path and Path(teacher.path).exists():
        # A retrained policy at the same path writes different answers (on-policy preference pairs).
        described["weights"] = _weights_hash(Path(teacher.path))
    return described


def _weights_hash(path: Path) -> str:
    """What a local model or run folder generates with: weights, configs, tokenizer, chat template (top level
    only: checkpoints, manifests and model cards do not change the answers)."""
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if file.is_file() and (file.suffix in WEIGHT_SUFFIXES or file.name.endswith("config.json")
                               or file.name.startswith("tokenizer")):
            digest.update(file.name.encode() + file_sha256(file).encode())
    return digest.hexdigest()


def _method_identity(method: Any) -> dict[str, Any]:
    described = method.model_dump(mode="json", exclude={"policy"})
    described["policy"] = _teacher_identity(getattr(method, "policy", None))
    for key, value in list(described.items()):
        paths = value if isinstance(value, list) else [value]
        if paths and all(isinstance(v, str) and os.path.isabs(v) and Path(v).exists() for v in paths):
            described[key] = [_content_hash(Path(v)) for v in paths]
    return described


def _content_hash(path: Path) -> str:
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(str(file.relative_to(path)).encode() + file_sha256(file).encode())
    return digest.hexdigest()


def recorded_fingerprint(out: Path) -> str | None:
    """The generation fingerprint the journal in `out` was made under (None: no journal yet)."""
    state = out / STATE
    return json.loads(state.read_text()).get("fingerprint") if state.is_file() else None


def _claim(out: Path, fingerprint: str, overwrite: bool) -> None:
    """Refuse to mix items made under different settings in one journal."""
    state = out / STATE
    if overwrite and out.exists():
        shutil.rmtree(out)
    if state.is_file():
        previous = json.loads(state.read_text()).get("fingerprint")
        if previous != fingerprint:
            raise SynthError(
                f"{out}: its items were generated with a different teacher, methods, inputs or prompts; "
                "rerun with --overwrite to start again (or choose another synth.output_dir)"
            )
        return
    if (out / JOURNAL).exists():
        raise SynthError(f"{out}: has a journal but no {STATE}; rerun with --overwrite to start again")
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(state, json.dumps({"fingerprint": fingerprint}, indent=2) + "\n")


def _report(section: SynthSection, outcome: Outcome, wall: float, new_items: int, fingerprint: str) -> dict[str, Any]:
    generated = Counter(r["method"] for r in outcome.generated)
    rejected_at_generation: dict[str, Counter[str]] = {}
    for record in outcome.rejects:
        if record["stage"] in ("teacher", "validation"):
            rejected_at_generation.setdefault(record["method"], Counter())[_reason_kind(record["reason"])] += 1
    tokens = Counter()
    for record in outcome.generated:
        tokens.update(record.get("usage") or {})
    return {
        "generated": dict(generated),
        "rejected_at_generation": {m: dict(c) for m, c in rejected_at_generation.items()},
        "removed_by_filter": dict(outcome.filter_counts),
        "decontaminated": len(outcome.matches),
        "kept": {"sft": len(outcome.sft), "preferences": len(outcome.preferences),
                 "sft_by_method": dict(Counter(r["method"] for r in outcome.sft))},
        "rejects": len(outcome.rejects),
        "tokens": dict(tokens),
        "new_items": new_items,
        "wall_s": round(wall, 2),
        "items_per_s": round(new_items / wall, 3) if wall > 0 else None,
        "decontamination": {
            "eval_sets": [{"file": str(p), "sha256": file_sha256(p)} for p in section.decontaminate.eval_sets],
            "ngram": section.decontaminate.ngram,
            "fuzzy_threshold": section.decontaminate.fuzzy_threshold,
            "matches": outcome.matches,
        },
        "fingerprint": fingerprint,
    }


def _reason_kind(reason: str) -> str:
    """A reason without its particulars, for counting: 'task too short (2 words, min 3)' -> 'task too short'."""
    return reason.split(" (")[0].split(": ")[0].strip()


def _write_outputs(out: Path, outcome: Outcome, report: dict[str, Any], with_pairs: bool) -> None:
    def jsonl(records: list[Record]) -> str:
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)

    sft = [{"id": r["id"], "method": r["method"], "messages": r["messages"], "scores": r.get("scores", {}),
            "provenance": r["provenance"]} for r in outcome.sft]
    pairs = [{"id": r["id"], "method": r["method"], "prompt": r["prompt"], "chosen": r["chosen"],
              "rejected": r["rejected"], "scores": r["scores"], "provenance": r["provenance"]}
             for r in outcome.preferences]
    write_atomic(out / "sft.jsonl", jsonl(sft))
    if with_pairs or (out / "preferences.jsonl").exists():  # present, even empty, when the recipe asks for pairs
        write_atomic(out / "preferences.jsonl", jsonl(pairs))
    write_atomic(out / "rejects.jsonl", jsonl(outcome.rejects))
    write_atomic(out / "report.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
