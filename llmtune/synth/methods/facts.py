"""Fact templates: a table of facts (one row per entity, one column per attribute) becomes question/answer and
multiple-choice items, deterministically from the run seed, with no teacher.

The templates file (YAML) names the entity column and, per attribute, question phrasings, answer phrasings and
a multiple-choice stem, all Jinja over the row's columns:

    entity: drug
    attributes:
      drug_class:
        questions: ["What class of medicine is {{ drug }}?", ...]
        answers: ["{{ drug | sentence }} is a {{ drug_class }}.", ...]
        multiple_choice: "Which class of medicine does {{ drug }} belong to?"
        reverse:   # optional: questions whose answer is the entity (the other direction of the fact)
          questions: ["Name a {{ drug_class }}.", ...]
          answers: ["{{ drug | sentence }} is a {{ drug_class }}.", ...]

A model trained on one direction of a fact ("metformin is a biguanide") does not learn the other ("which drug is
a biguanide?") — the reversal curse (Berglund et al., 2023) — so tables should carry both.

`fact_contrasts` renders the same templates into preference pairs: the chosen answer states the fact, the rejected
one is the same answer rendered with another entity's value ("Metformin is classed as a sulfonylurea"), or, for a
reverse question, naming an entity whose value differs. Supervised fine-tuning on facts raises the likelihood of
every value it saw, under every question; a multiple-choice item whose distractors are other entities' values
then hinges on the link between entity and value, which is what these pairs train (DPO).
"""

from __future__ import annotations

import csv
import random
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmtune.config import RecipeError
from llmtune.data.loading import read_jsonl
from llmtune.hashing import file_sha256
from llmtune.synth.prompts import render_string
from llmtune.synth.recipe import FactContrastsMethod, FactTemplatesMethod
from llmtune.synth.records import Record, accepted, rejected

LETTERS = "ABCDEFGH"


class _Phrasings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    questions: list[str] = Field(min_length=1)
    answers: list[str] = Field(min_length=1)


class _Attribute(_Phrasings):
    multiple_choice: str | None = None
    reverse: _Phrasings | None = None


class _Templates(BaseModel):
    model_config = ConfigDict(extra="forbid")
    entity: str
    attributes: dict[str, _Attribute] = Field(min_length=1)


def fact_items(method: FactTemplatesMethod, run_seed: int) -> list[Record]:
    templates, rows, provenance_base = _load_facts(method)
    records: list[Record] = []
    for row_id, row in rows:
        for attribute, phrasing in templates.attributes.items():
            if not str(row.get(attribute) or "").strip():
                continue  # this entity has no value for the attribute
            base_id = f"fact_templates:{method.table.stem}:{row_id}:{attribute}"
            rng = random.Random(f"{run_seed}/{base_id}")
            where = f"{method.templates}: attributes.{attribute}"
            provenance = {"method": "fact_templates", "fact": f"{row_id}.{attribute}", **provenance_base}
            records += _question_answers(f"{base_id}:qa", phrasing, method.questions_per_fact, rng, where, row,
                                         provenance)
            if phrasing.reverse:
                records += _question_answers(f"{base_id}:rev", phrasing.reverse, method.reverse_per_fact, rng,
                                             f"{where}.reverse", row, {**provenance, "direction": "reverse"})
            if phrasing.multiple_choice:
                others = _distinct_values(rows, attribute, exclude=str(row[attribute]))
                for k in range(method.multiple_choice_per_fact):
                    item_id = f"{base_id}:mcq{k}"
                    if len(others) < method.choices - 1:
                        records.append(rejected(item_id, "fact_templates", "validation",
                                                f"only {len(others)} distinct other values of {attribute} for "
                                                f"{method.choices - 1} distractors", provenance))
                        continue
                    records.append(_multiple_choice(item_id, row, attribute, phrasing, others, rng, method.choices,
                                                    where, provenance))
    return records


def fact_contrasts(method: FactContrastsMethod, run_seed: int) -> list[Record]:
    """Chosen/rejected pairs: the fact's answer against the same answer with another entity's value."""
    templates, rows, provenance_base = _load_facts(method)
    records: list[Record] = []
    for row_id, row in rows:
        for attribute, phrasing in templates.attributes.items():
            value = str(row.get(attribute) or "").strip()
            if not value:
                continue
            base_id = f"fact_contrasts:{method.table.stem}:{row_id}:{attribute}"
            rng = random.Random(f"{run_seed}/{base_id}")
            where = f"{method.templates}: attributes.{attribute}"
            provenance = {"method": "fact_contrasts", "fact": f"{row_id}.{attribute}", **provenance_base}
            others = [other for _, other in rows if str(other.get(attribute) or "").strip().lower() not in
                      ("", value.lower())]
            if not others:
                continue  # every entity shares this value: nothing to contrast with
            # Forward: the same answer with another entity's value. Reverse: another entity, whose value differs.
            swaps = [(f"{base_id}:pair", phrasing, method.pairs_per_fact, attribute, {}),
                     (f"{base_id}:rev", phrasing.reverse, method.reverse_pairs_per_fact, templates.entity,
                      {"direction": "reverse"})]
            for id_prefix, phrasings, count, swapped, extra in swaps:
                if phrasings is not None:
                    records += _contrast_pairs(id_prefix, phrasings, count, swapped, rng, where, row, others,
                                               {**provenance, **extra})
    return records


def _contrast_pairs(id_prefix: str, phrasings: _Phrasings, count: int, swapped: str, rng: random.Random, where: str,
                    row: dict[str, Any], others: list[dict[str, Any]], provenance: dict[str, Any]) -> list[Record]:
    """`count` pairs: an answer rendered from `row`, and the same answer with `swapped` taken from another row."""
    questions = rng.sample(phrasings.questions, len(phrasings.questions))
    records = []
    for k in range(count):
        item_id = f"{id_prefix}{k}"
        question = render_string(questions[k % len(questions)], where, **row)
        answer = rng.choice(phrasings.answers)
        other = rng.choice(others)
        chosen = render_string(answer, where, **row)
        wrong = render_string(answer, where, **{**row, swapped: other[swapped]})
        pair_provenance = {**provenance, "rejected_from": str(other.get("id") or "")}
        if wrong.strip().lower() == chosen.strip().lower():
            records.append(rejected(item_id, "fact_contrasts", "validation",
                                    f"answer phrasing {answer!r} does not name {swapped}", pair_provenance))
            continue
        pair = {"prompt": [{"role": "user", "content": question}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": wrong}]}
        records.append(accepted(item_id, "fact_contrasts", pair_provenance, pair=pair))
    return records


def _load_facts(method: FactTemplatesMethod | FactContrastsMethod
                ) -> tuple[_Templates, list[tuple[str, dict[str, Any]]], dict[str, Any]]:
    """The templates, the table's rows (checked against each other) and the provenance every item carries."""
    templates = _read_templates(method.templates)
    rows = read_table(method.table)
    _check_columns(method.table, rows, templates)
    provenance = {"table": method.table.name, "table_sha256": file_sha256(method.table)[:16],
                  "templates": method.templates.name, "templates_sha256": file_sha256(method.templates)[:16]}
    return templates, rows, provenance


def _question_answers(id_prefix: str, phrasing: _Phrasings, count: int, rng: random.Random, where: str,
                      row: dict[str, Any], provenance: dict[str, Any]) -> list[Record]:
    """`count` question/answer items, each question phrasing used once before any repeats."""
    questions = rng.sample(phrasing.questions, len(phrasing.questions))
    records = []
    for k in range(count):
        question = render_string(questions[k % len(questions)], where, **row)
        answer = render_string(rng.choice(phrasing.answers), where, **row)
        records.append(accepted(f"{id_prefix}{k}", "fact_templates", provenance, messages=_turns(question, answer)))
    return records


def _multiple_choice(item_id: str, row: dict[str, Any], attribute: str, phrasing: _Attribute, others: list[str],
                     rng: random.Random, n_choices: int, where: str, provenance: dict[str, Any]) -> Record:
    correct = str(row[attribute])
    options = [correct, *rng.sample(others, n_choices - 1)]
    rng.shuffle(options)
    letter = LETTERS[options.index(correct)]
    stem = render_string(phrasing.multiple_choice or "", where, **row)
    # MMLU's layout (`A. option` lines, the answer starts with the letter), as `choices_format: letters` scores it
    listed = "\n".join(f"{LETTERS[i]}. {option}" for i, option in enumerate(options))
    question = f"{stem}\n{listed}"
    explanation = render_string(rng.choice(phrasing.answers), where, **row)
    answer = f"{letter}. {correct}" + (f". {explanation}" if explanation.strip().lower() != correct.lower() else "")
    provenance = {**provenance, "choices": options, "answer": letter}
    messages = _turns(question, answer)
    return accepted(item_id, "fact_templates", provenance, messages=messages)


def _turns(question: str, answer: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _distinct_values(rows: list[tuple[str, dict[str, Any]]], attribute: str, exclude: str) -> list[str]:
    seen: dict[str, str] = {}
    for _, row in rows:
        value = str(row.get(attribute) or "").strip()
        if value and value.lower() != exclude.strip().lower():
            seen.setdefault(value.lower(), value)
    return sorted(seen.values())


def read_table(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(row id, row) pairs from a csv or jsonl table; the id is the `id` column, else the 1-based row number."""
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    elif path.suffix.lower() == ".jsonl":
        rows = [row for _, row in read_jsonl(path, objects=True)]
    else:
        raise RecipeError(f"{path}: a fact table is .csv or .jsonl")
    if not rows:
        raise RecipeError(f"{path}: the fact table has no rows")
    identified = [(str(row.get("id") or number), row) for number, row in enumerate(rows, start=1)]
    ids = [row_id for row_id, _ in identified]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise RecipeError(f"{path}: duplicate ids: {', '.join(duplicates[:5])}")
    return identified


def _read_templates(path: Path) -> _Templates:
    try:
        return _Templates.model_validate(yaml.safe_load(path.read_text()))
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise RecipeError(f"{path}: {where}: {first['msg']}") from None


def _check_columns(table: Path, rows: list[tuple[str, dict[str, Any]]], templates: _Templates) -> None:
    columns = set(rows[0][1])
    missing = [c for c in (templates.entity, *templates.attributes) if c not in columns]
    if missing:
        raise RecipeError(f"{table}: columns {', '.join(missing)} (named by the templates) are missing; "
                          f"the table has {', '.join(sorted(columns))}")
