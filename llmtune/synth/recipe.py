"""The recipe's `synth` section: which teacher, which methods, which filters, which eval sets to keep out.

`llmtune synth RECIPE` reads only this section, so one recipe file can carry synthesis and training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from llmtune.config import RecipeError, Section, load_section


class TeacherSection(Section):
    """A model that writes: an OpenAI-compatible endpoint, or a local model run in this process."""

    kind: Literal["openai", "local"] = "openai"
    # openai: the endpoint and the served model's name; the key comes from the environment variable named here.
    base_url: str | None = None
    model: str | None = None
    api_key_env: str | None = None
    max_concurrency: int = Field(8, gt=0)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(4, ge=0)  # on 408/409/429/5xx and timeouts, exponential backoff with jitter
    # local: a model (hub id, folder, .gguf, builtin:NAME) or a trained run folder (its adapter is used).
    path: str | None = None
    # both
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    max_tokens: int = Field(256, gt=0)

    @model_validator(mode="after")
    def _rules(self) -> TeacherSection:
        if self.kind == "openai" and not (self.base_url and self.model):
            raise ValueError("an `openai` teacher needs `base_url` and `model` (the name the endpoint serves)")
        if self.kind == "local" and not self.path:
            raise ValueError("a `local` teacher needs `path` (a model, builtin:NAME or a trained run folder)")
        return self


class FactTemplatesMethod(Section):
    """Question/answer and multiple-choice items from a table of facts; deterministic, no teacher."""

    kind: Literal["fact_templates"]
    table: Path  # csv or jsonl, one row per entity
    templates: Path  # YAML: entity column, per attribute question/answer/mcq phrasings (Jinja)
    questions_per_fact: int = Field(2, ge=0)
    multiple_choice_per_fact: int = Field(1, ge=0)
    reverse_per_fact: int = Field(1, ge=0)  # items asking for the entity, where the templates have `reverse:`
    choices: int = Field(4, ge=2, le=8)


class FactContrastsMethod(Section):
    """Preference pairs from a table of facts, no teacher: the chosen answer states the fact, the rejected one is
    the same sentence with another entity's value (a hard negative, like a multiple-choice distractor)."""

    kind: Literal["fact_contrasts"]
    table: Path
    templates: Path  # the fact_templates file: its questions and answers are rendered twice
    pairs_per_fact: int = Field(2, ge=0)
    reverse_pairs_per_fact: int = Field(1, ge=0)  # value -> entity questions, where the templates have `reverse:`


class SelfInstructMethod(Section):
    """New tasks from few-shot samples of seed tasks and accepted machine tasks, then the teacher's answers."""

    kind: Literal["self_instruct"]
    seeds: Path  # jsonl rows with `instruction` (and optionally `output`)
    num_items: int = Field(50, gt=0)
    batch_size: int = Field(16, gt=0)  # tasks per round; a round's few-shot pool is fixed when it starts
    seed_examples: int = Field(3, ge=1)
    machine_examples: int = Field(2, ge=0)
    domain: str = "general"
    prompt: str = "self_instruct"
    answer_prompt: str = "answer"


EvolOperation = Literal["deepen", "constraints", "concretize", "reasoning"]


class EvolMethod(Section):
    """Evol-Instruct rewrites of tasks accepted earlier in this run (or seed tasks), then answers."""

    kind: Literal["evol"]
    source: Literal["self_instruct", "seeds", "all"] = "all"
    seeds: Path | None = None
    num_items: int = Field(20, gt=0)
    operations: list[EvolOperation] = Field(["deepen", "constraints", "concretize", "reasoning"], min_length=1)
    answer_prompt: str = "answer"
    domain: str = "general"


class DocQaMethod(Section):
    """Question/answer pairs grounded in chunks of domain documents (txt/md, or text extracted from PDFs)."""

    kind: Literal["doc_qa"]
    documents: list[Path] = Field(min_length=1)  # files or folders (every .txt/.md inside)
    chunk_words: int = Field(180, ge=20)
    questions_per_chunk: int = Field(2, gt=0)
    min_grounding: float = Field(0.3, ge=0, le=1)  # share of the answer's content words found in the chunk
    question_prompt: str = "doc_question"
    answer_prompt: str = "doc_answer"


class PreferencesMethod(Section):
    """Chosen/rejected pairs: sample k answers per prompt from a policy, score them with a judge."""

    kind: Literal["preferences"]
    # `sft`: the prompts and reference answers this run kept; or a jsonl file of messages/alpaca rows.
    prompts: Literal["sft"] | Path = "sft"
    max_prompts: int | None = Field(None, gt=0)
    policy: TeacherSection | None = None  # default: the teacher
    samples: int = Field(4, ge=1, le=16)  # 1 only with `chosen: reference`
    judge: Literal["reference", "rubric"] = "reference"
    judge_prompt: str = "judge_rubric"
    min_margin: float = Field(0.1, ge=0)  # chosen must beat rejected by this much (scores are 0..1)
    # best_sample: the best of the k samples is chosen; reference: the prompt's reference answer is (SPIN).
    chosen: Literal["best_sample", "reference"] = "best_sample"


TEACHERLESS = ("fact_templates", "fact_contrasts", "preferences")  # preferences: its own `policy:` may do
FACT_METHODS = ("fact_templates", "fact_contrasts")
PAIR_METHODS = ("preferences", "fact_contrasts")  # methods whose items are chosen/rejected pairs

Method = Annotated[
    FactTemplatesMethod | FactContrastsMethod | SelfInstructMethod | EvolMethod | DocQaMethod | PreferencesMethod,
    Field(discriminator="kind"),
]


class NearDuplicates(Section):
    method: Literal["rouge_l", "minhash"] = "rouge_l"
    threshold: float = Field(0.7, gt=0, le=1)  # ROUGE-L F1 (Self-Instruct's 0.7), or estimated Jaccard
    num_perm: int = Field(128, ge=16)  # minhash
    # Fact templates vary phrasings of one fact on purpose: compare teacher-written prompts by default.
    methods: list[str] = Field(default_factory=lambda: ["self_instruct", "evol", "doc_qa"])


class FiltersSection(Section):
    min_prompt_words: int = Field(3, ge=0)
    max_prompt_words: int = Field(300, gt=0)
    min_response_words: int = Field(2, ge=0)
    max_response_words: int = Field(400, gt=0)
    near_duplicates: NearDuplicates | None = NearDuplicates()
    refusals: bool = True  # drop answers that refuse or talk about being an AI
    blocked_keywords: list[str] = Field(default_factory=list)


class DecontaminationSection(Section):
    eval_sets: list[Path] = Field(default_factory=list)  # jsonl: questions, prompts, messages or alpaca rows
    ngram: int = Field(13, ge=3)
    # Lightly reworded copies: share of an eval item's content words found, in order, in a synthesized item.
    fuzzy_threshold: float | None = Field(0.7, gt=0, le=1)
    fuzzy_min_words: int = Field(6, ge=3)  # shorter eval items are matched exactly only


class SynthSection(Section):
    output_dir: Path
    seed: int = 0
    system_prompt: str | None = None  # put first in every synthesized conversation
    teacher: TeacherSection | None = None
    methods: list[Method] = Field(min_length=1)
    filters: FiltersSection = FiltersSection()
    decontaminate: DecontaminationSection = DecontaminationSection()

    @model_validator(mode="after")
    def _rules(self) -> SynthSection:
        needs_teacher = [m.kind for m in self.methods if m.kind not in TEACHERLESS]
        if needs_teacher and self.teacher is None:
            raise ValueError(f"methods {', '.join(needs_teacher)} need a `teacher:` section")
        for index, method in enumerate(self.methods):
            if method.kind == "preferences" and method.policy is None and self.teacher is None:
                raise ValueError(f"methods[{index}] (preferences) needs a `policy:` or a `teacher:`")
            if method.kind == "preferences" and method.samples < 2 and method.chosen != "reference":
                raise ValueError(f"methods[{index}] (preferences): a pair needs 2 samples unless "
                                 "`chosen: reference` (then the one sample is the rejected side)")
            if method.kind == "preferences" and method.judge == "rubric" and self.teacher is None:
                raise ValueError(f"methods[{index}]: `judge: rubric` asks the teacher: add a `teacher:` section")
        # Item ids are built from the method kind (and a fact table's file name): they must not collide.
        keys = [f"{m.kind}:{m.table.stem}" if m.kind in FACT_METHODS else m.kind for m in self.methods]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} appears more than once (fact tables need distinct file names)")
        return self


def load_synth_recipe(path: str | Path, overrides: list[str] | None = None) -> SynthSection:
    """The `synth` section of a recipe, validated, with input paths resolved against the recipe's folder."""
    section = load_section(path, overrides, "synth", SynthSection, "recipes/clinical-qa/synth-tiny.yaml")
    return resolve_synth_paths(section, Path(path).parent, Path(path))


def resolve_synth_paths(section: SynthSection, base: Path, path: Path) -> SynthSection:
    """Input paths resolved against the recipe's folder (each checked); output_dir against the working directory."""
    problems: list[str] = []

    def local(value: Path, key: str) -> Path:
        resolved = (base / value).resolve()
        if not resolved.exists():
            problems.append(f"synth.{key}: file not found: {value} (looked in {resolved})")
        return resolved

    methods: list[Any] = []
    for index, method in enumerate(section.methods):
        where = f"methods[{index}]"
        updates: dict[str, Any] = {}
        for name in ("table", "templates", "seeds"):
            if getattr(method, name, None) is not None:
                updates[name] = local(getattr(method, name), f"{where}.{name}")
        if method.kind == "doc_qa":
            updates["documents"] = [local(d, f"{where}.documents[{i}]") for i, d in enumerate(method.documents)]
        if method.kind == "preferences" and method.prompts != "sft":
            updates["prompts"] = local(Path(method.prompts), f"{where}.prompts")
        if method.kind == "preferences" and method.policy is not None:
            updates["policy"] = _resolve_teacher(method.policy, base)
        for name in ("prompt", "answer_prompt", "question_prompt", "judge_prompt"):
            value = getattr(method, name, None)
            if value is not None and value.endswith(".jinja"):  # a file of the user's; else a name in prompts/
                updates[name] = str(local(Path(value), f"{where}.{name}"))
        methods.append(method.model_copy(update=updates))
    eval_sets = [local(e, f"decontaminate.eval_sets[{i}]") for i, e in enumerate(section.decontaminate.eval_sets)]
    decontaminate = section.decontaminate.model_copy(update={"eval_sets": eval_sets})
    if problems:
        raise RecipeError(f"{path}: invalid recipe\n" + "\n".join(f"  {p}" for p in problems))
    teacher = _resolve_teacher(section.teacher, base) if section.teacher is not None else None
    output_dir = section.output_dir.resolve()  # like a training recipe's: relative to where you run it
    return section.model_copy(
        update={"methods": methods, "teacher": teacher, "decontaminate": decontaminate, "output_dir": output_dir}
    )


def _resolve_teacher(teacher: TeacherSection, base: Path) -> TeacherSection:
    # A local model path is relative to the recipe's folder when something is there; else a hub id or builtin.
    if teacher.kind == "local" and teacher.path and (base / teacher.path).exists():
        return teacher.model_copy(update={"path": str((base / teacher.path).resolve())})
    return teacher
