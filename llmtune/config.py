"""Typed recipes: one YAML file per run, validated before anything touches the disk.

Unknown keys are errors with a "did you mean" hint, cross-field rules give one message, input paths are
checked, and secrets are refused (they come only from the environment).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmtune.errors import LlmtuneError

BUILTIN_PREFIX = "builtin:"
# Keys whose value would be a credential: the recipe is shared and saved with every artifact.
_SECRET_KEY = re.compile(r"(^|_)(token|api_?key|password|secret)$", re.IGNORECASE)  # not `max_tokens`, `api_key_env`
_SECRET_VALUE = re.compile(r"\b(hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9_-]{20,})\b")


SectionT = TypeVar("SectionT", bound=BaseModel)


class RecipeError(LlmtuneError, ValueError):
    """A recipe that cannot run; the message names the file and the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSection(Section):
    # A hub id, a local folder, a .gguf file, or a builtin (`builtin:tiny`, `builtin:smollm2-135m-instruct`).
    name_or_path: str
    gguf_file: str | None = None
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # auto: sdpa, except in CPU training on short rows, where eager is faster (llmtune/train/speed.py)
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    trust_remote_code: bool = False
    # A Jinja chat template file that replaces the tokenizer's own (relative to the recipe's folder).
    chat_template: Path | None = None


class QuantizationSection(Section):
    load_in: Literal["4bit", "8bit"]
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class AdapterSection(Section):
    kind: Literal["lora", "dora"] = "lora"
    r: int = Field(16, gt=0)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    rslora: bool = False
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    modules_to_save: list[str] = []
    # LoRA on these transformer blocks only (0 = the first; negative counts from the last), peft's
    # `layers_to_transform`. None: every block.
    layers: list[int] | None = Field(None, min_length=1)


DataFormat = Literal["auto", "messages", "alpaca", "sharegpt", "prompt_completion", "preference"]


class DataSource(Section):
    # A local file (.jsonl/.json/.csv/.parquet), a dataset folder (both relative to the recipe's folder),
    # or a hub dataset id (online, or from the local datasets cache).
    path: str
    format: DataFormat = "auto"
    split: str = "train"
    subset: str | None = None
    max_rows: int | None = Field(None, gt=0)

    @property
    def is_local(self) -> bool:
        return Path(self.path).suffix.lower() in {".jsonl", ".json", ".csv", ".parquet"}


class DataSection(Section):
    train: list[DataSource] = Field(min_length=1)
    validation: list[DataSource] = []
    validation_fraction: float = Field(0.0, ge=0, lt=0.5)
    on_bad_row: Literal["error", "skip"] = "error"
    loss_on: Literal["assistant", "all"] = "assistant"
    system_prompt: str | None = None
    max_length: int | None = Field(1024, gt=0)
    truncation: Literal["keep_start", "keep_end"] = "keep_start"
    packing: bool = False

    @model_validator(mode="after")
    def _rules(self) -> DataSection:
        if self.validation and self.validation_fraction:
            raise ValueError("give either `validation` files or `validation_fraction`, not both")
        if self.packing and self.max_length is None:
            raise ValueError("`packing: true` needs `max_length` (the length of a packed row)")
        return self


def metric_key(metric: str) -> str:
    """The name the Trainer logs a validation metric under (`loss` -> `eval_loss`)."""
    return metric if metric.startswith("eval_") else f"eval_{metric}"


class EarlyStoppingSection(Section):
    """Stop when the validation metric has not improved for `patience` evaluations; the best checkpoint is the
    one saved (transformers' EarlyStoppingCallback with load_best_model_at_end)."""

    metric: str = "eval_loss"  # any metric the validation pass reports (`loss` and `eval_loss` are the same)
    mode: Literal["min", "max"] | None = None  # None: min for a loss, max for anything else
    patience: int = Field(3, ge=1)  # evaluations without improvement before stopping
    min_delta: float = Field(0.0, ge=0)  # an improvement smaller than this does not count

    @property
    def greater_is_better(self) -> bool:
        return self.mode == "max" if self.mode else not self.metric.removeprefix("eval_").endswith("loss")


class TrainSection(Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(4, gt=0)
    grad_accum: int = Field(1, gt=0)
    learning_rate: float = Field(2e-4, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    # adamw_torch_fused: torch's AdamW as one fused kernel per step (CPU and CUDA), same update as adamw_torch;
    # SmolLM2's 4.9 M LoRA parameters: 6.6 against 20.6 ms a step on the 2-core CPU
    optimizer: Literal[
        "adamw_torch", "adamw_torch_fused", "adamw_8bit", "paged_adamw_8bit", "sgd"] = "adamw_torch_fused"
    # auto: bf16 autocast where the GPU or CPU computes in bf16 natively (AVX512-BF16, AMX), else fp32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # auto: on only when training without it would not fit in memory (the decision is logged)
    gradient_checkpointing: bool | Literal["auto"] = "auto"
    # Batches of rows of similar length (transformers' LengthGroupedSampler, still shuffled): far less padding
    # when row lengths vary (short answers next to multiple-choice rows), so more rows per second.
    # None: on for sft, off for preference methods (their rows are pairs).
    group_by_length: bool | None = None
    # A batch runs as one packed row of its real tokens, no padding (attention still per row): same loss and
    # gradients, fewer tokens through the model (CPU label-only head path; llmtune/train/shared_prefix.py).
    padding_free: bool = True
    # In that packed row, tokens that rows of a batch begin with (a system prompt; a DPO pair's prompt) run once
    # per batch or pair instead of once per row. Under LoRA dropout the rows share the prefix's dropout mask.
    shared_prefix: bool = True
    logging_steps: int = Field(10, gt=0)
    eval_steps: int | None = Field(None, gt=0)
    # Checkpoints (atomic; resume picks the newest complete one). None: only at the end and on SIGTERM.
    save_steps: int | None = Field(None, gt=0)
    save_total_limit: int = Field(2, ge=1)
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = []
    dataloader_num_workers: int = Field(0, ge=0)
    early_stopping: EarlyStoppingSection | None = None
    # Save the checkpoint with the best validation metric as the run's output (always on with early_stopping).
    keep_best: bool = False

    @property
    def selects_best(self) -> bool:
        return self.keep_best or self.early_stopping is not None


class GradualUnfreezing(Section):
    """Train the top blocks first, then unfreeze `blocks_per_phase` more blocks (downwards) every `every`
    steps or epochs (ULMFiT's gradual unfreezing)."""

    every: int = Field(gt=0)
    unit: Literal["steps", "epochs"] = "steps"
    start_blocks: int = Field(1, gt=0)  # blocks trainable in the first phase, counted from the last
    blocks_per_phase: int = Field(1, gt=0)


class FreezeSection(Section):
    """Which transformer blocks train. Parameters outside the blocks (embeddings, final norm, LM head) stay
    frozen in full fine-tuning; a classification head and `adapter.modules_to_save` always train."""

    # Full fine-tuning (no adapter) of the last N blocks only; the rest of the network is frozen.
    train_last_blocks: int | None = Field(None, gt=0)
    gradual: GradualUnfreezing | None = None

    @model_validator(mode="after")
    def _rules(self) -> FreezeSection:
        if self.train_last_blocks is None and self.gradual is None:
            raise ValueError("give `train_last_blocks` or `gradual` (or remove the `freeze:` section)")
        return self


class ClassificationSection(Section):
    """`task: classification`: a new head over the pretrained body predicts one of `labels` for each row."""

    labels: list[str] = Field(min_length=2)
    text_field: str = "text"
    label_field: str = "label"
    # normal: N(0, initializer_range²), as transformers initialises a new head; zeros: every class starts equal
    head_init: Literal["normal", "zeros"] = "normal"

    @model_validator(mode="after")
    def _rules(self) -> ClassificationSection:
        if len(set(self.labels)) != len(self.labels):
            raise ValueError("`labels` must be unique")
        return self


class PreferenceSection(Section):
    """Preference optimisation (method: dpo | orpo | kto) through TRL's trainers."""

    beta: float = Field(0.1, gt=0)  # DPO/KTO: KL strength; ORPO: weight of the odds-ratio term
    # DPO only
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    # DPO only: weight of an SFT term, the mean NLL of the chosen answers' tokens, added to the preference loss
    # (RPO, Pang et al. 2024). It keeps DPO from lowering the chosen answers' likelihood along with the rejected.
    sft_weight: float = Field(0.0, ge=0)
    # DPO/KTO: reference log-probs computed once before training (one extra pass) instead of at every step.
    precompute_ref_log_probs: bool = False
    # An SFT output folder to continue from: its recipe gives the base model, its adapter the starting point
    # (and, frozen, the reference), its tokenizer the chat template.
    from_run: Path | None = None


class Recipe(Section):
    method: Literal["sft", "dpo", "orpo", "kto"] = "sft"
    # causal_lm: the model learns to write the answers; classification: a head predicts one label per row
    task: Literal["causal_lm", "classification"] = "causal_lm"
    output_dir: Path
    seed: int = 42
    model: ModelSection
    quantization: QuantizationSection | None = None
    adapter: AdapterSection | None = None
    data: DataSection
    train: TrainSection = TrainSection()
    preference: PreferenceSection = PreferenceSection()
    freeze: FreezeSection | None = None
    classification: ClassificationSection | None = None

    @model_validator(mode="after")
    def _rules(self) -> Recipe:
        self._check_task()
        self._check_selection()
        from_run = self.preference.from_run
        if from_run is not None and self.method == "sft":
            raise ValueError("`preference.from_run` is only used with a preference method (dpo, orpo, kto)")
        if self.preference.loss_type != "sigmoid" and self.method != "dpo":
            raise ValueError("`preference.loss_type` applies to `method: dpo` only")
        if self.preference.sft_weight and self.method != "dpo":
            raise ValueError("`preference.sft_weight` applies to `method: dpo` only")
        if from_run is not None and self.adapter is not None:
            raise ValueError(
                "with `preference.from_run` the adapter comes from that run: remove the `adapter:` section"
            )
        if self.method != "sft" and self.adapter is None and from_run is None:
            raise ValueError(
                "preference training in llmtune trains an adapter, so the reference model is the same weights "
                "with the adapter off (never a second copy): add an `adapter:` section or `preference.from_run`"
            )
        if self.quantization is not None and self.adapter is None and from_run is None:
            raise ValueError(
                f"a {self.quantization.load_in} base cannot be trained directly: add an `adapter:` section (QLoRA)"
            )
        if self.method == "kto" and self.train.group_by_length:
            raise ValueError("`train.group_by_length` cannot be used with `method: kto`: TRL's KTO pairs each row "
                             "with its neighbours in a fixed order (sequential sampling)")
        if self.train.eval_steps and not (self.data.validation or self.data.validation_fraction):
            raise ValueError(
                "`train.eval_steps` needs validation data: set `data.validation` or `data.validation_fraction`"
            )
        if self.adapter and self.adapter.kind == "dora" and self.quantization and self.quantization.load_in == "8bit":
            raise ValueError("DoRA is not supported on 8-bit bases by peft; use `load_in: 4bit` or `kind: lora`")
        return self

    def _check_task(self) -> None:
        if self.task == "classification":
            if self.classification is None:
                raise ValueError("`task: classification` needs a `classification:` section with its `labels`")
            if self.method != "sft":
                raise ValueError("`task: classification` trains with `method: sft` (supervised labels)")
            if self.data.packing:
                raise ValueError("`data.packing` does not apply to `task: classification` (one label per row)")
        elif self.classification is not None:
            raise ValueError("a `classification:` section needs `task: classification`")
        freeze = self.freeze
        if freeze is not None and freeze.train_last_blocks is not None and self.adapter is not None:
            raise ValueError("`freeze.train_last_blocks` is full fine-tuning of those blocks: remove the `adapter:` "
                             "section, or put LoRA on chosen blocks with `adapter.layers`")
        if freeze is not None and (self.method != "sft" or self.preference.from_run is not None):
            raise ValueError("`freeze:` applies to `method: sft`")

    def _check_selection(self) -> None:
        train = self.train
        if not train.selects_best:
            return
        what = "train.early_stopping" if train.early_stopping else "train.keep_best"
        if not (self.data.validation or self.data.validation_fraction):
            raise ValueError(f"`{what}` needs validation data: set `data.validation` or `data.validation_fraction`")
        if train.save_steps and train.eval_steps and train.save_steps % train.eval_steps:
            raise ValueError(f"`{what}` saves a checkpoint at each evaluation: `train.save_steps` "
                             f"({train.save_steps}) must be a multiple of `train.eval_steps` ({train.eval_steps})")


# --------------------------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, override (`a.b=c`), validate and resolve a recipe; raise RecipeError naming file and key."""
    path = Path(path)
    raw = read_raw_recipe(path, overrides)
    raw.pop("sweep", None)  # a sweep's search space; training the file trains its own values (llmtune/sweep)
    return recipe_from_mapping(raw, path)


def recipe_from_mapping(raw: dict[str, Any], path: Path, prefix: str = "") -> Recipe:
    """A train recipe from its mapping, as if read from `path` (relative paths, errors named `prefix…`)."""
    _inherit_from_run(raw, path)
    return _resolve_paths(validate_section(Recipe, raw, path, prefix), path.parent)


def read_raw_recipe(path: Path, overrides: list[str] | None = None) -> dict[str, Any]:
    """The recipe file as a mapping, with `--set` overrides applied and secrets refused."""
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections (model, data, train, ...)")
    for override in overrides or []:
        apply_override(raw, override, path)
    _refuse_secrets(raw, path)
    return raw


def load_section(path: str | Path, overrides: list[str] | None, key: str, model: type[SectionT],
                 example: str) -> SectionT:
    """One top-level section of a recipe file (`synth:`, `eval:`), validated; errors are named `key.…`."""
    path = Path(path)
    raw = read_raw_recipe(path, overrides)
    if key not in raw:
        raise RecipeError(f"{path}: no `{key}:` section (see {example})")
    return validate_section(model, raw[key], path, prefix=f"{key}.")


def validate_section(model: type[SectionT], raw: Any, path: Path, prefix: str = "") -> SectionT:
    """Validate `raw` as `model`; errors name the file and each key (under `prefix`, e.g. `synth.`)."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise RecipeError(f"{path}: invalid recipe\n" + _explain(err, model, prefix)) from None


def _inherit_from_run(raw: dict[str, Any], path: Path) -> None:
    """`preference.from_run`: take the base model (and its quantization) from that run's saved recipe."""
    section = raw.get("preference")
    from_run = section.get("from_run") if isinstance(section, dict) else None
    if not from_run:
        return
    run = (path.parent / from_run).resolve()
    saved = run / "recipe.yaml"
    if not (run / "adapter_config.json").is_file() or not saved.is_file():
        raise RecipeError(f"{path}: preference.from_run: {from_run} is not a finished llmtune run with an adapter")
    previous = yaml.safe_load(saved.read_text())
    if "model" in raw and raw["model"] != previous["model"]:
        raise RecipeError(f"{path}: model: differs from the base model of preference.from_run ({from_run}); remove it")
    raw["model"] = previous["model"]
    if previous.get("quantization") is not None and "quantization" not in raw:
        raw["quantization"] = previous["quantization"]
    section["from_run"] = str(run)


def apply_override(raw: dict[str, Any], override: str, path: Path) -> None:
    """Set `a.b.c=value` in the raw recipe; the value is parsed as YAML (numbers, bools, lists)."""
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise RecipeError(f"--set {override!r}: expected KEY=VALUE, e.g. train.learning_rate=1e-4")
    node: Any = raw
    *parents, leaf = key.split(".")
    for part in parents:
        if isinstance(node, list):  # `methods.0.table`: an index into a list of sections
            node = _list_item(node, part, key, path)
            continue
        child = node.setdefault(part, {})
        if not isinstance(child, dict | list):
            raise RecipeError(f"{path}: --set {key}: `{part}` is not a section")
        node = child
    if isinstance(node, list):
        node[_index(node, leaf, key, path)] = yaml.safe_load(value)
    else:
        node[leaf] = yaml.safe_load(value)


def _index(items: list[Any], part: str, key: str, path: Path) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise RecipeError(f"{path}: --set {key}: `{part}` is not an index of a list of {len(items)}")
    return int(part)


def _list_item(items: list[Any], part: str, key: str, path: Path) -> Any:
    item = items[_index(items, part, key, path)]
    if not isinstance(item, dict | list):
        raise RecipeError(f"{path}: --set {key}: item {part} is not a section")
    return item


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def _refuse_secrets(node: Any, path: Path, where: str = "") -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            here = f"{where}.{key}" if where else str(key)
            if _SECRET_KEY.search(str(key)):
                raise RecipeError(
                    f"{path}: {here}: secrets never go in a recipe (it is saved with every artifact); "
                    "set them in the environment (e.g. HF_TOKEN, OPENAI_API_KEY)"
                )
            _refuse_secrets(value, path, here)
    elif isinstance(node, list):
        for index, value in enumerate(node):
            _refuse_secrets(value, path, f"{where}[{index}]")
    elif isinstance(node, str) and _SECRET_VALUE.search(node):
        raise RecipeError(f"{path}: {where}: looks like a token; secrets come only from the environment")


def _resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Resolve input paths against the recipe's folder and check that local files exist."""
    problems: list[str] = []

    def local(value: str | Path, key: str) -> Path:
        resolved = (base / value).resolve()
        if not resolved.exists():
            problems.append(f"{key}: file not found: {value} (looked in {resolved})")
        return resolved

    model = recipe.model
    updates: dict[str, Any] = {}
    if not model.name_or_path.startswith(BUILTIN_PREFIX) and _looks_local(model.name_or_path, base):
        model = model.model_copy(update={"name_or_path": str(local(model.name_or_path, "model.name_or_path"))})
    if model.chat_template is not None:
        model = model.model_copy(update={"chat_template": local(model.chat_template, "model.chat_template")})
    updates["model"] = model

    def sources(items: list[DataSource], key: str) -> list[DataSource]:
        # Files must exist; a name that is not a file is a dataset folder if one exists there, else a hub id.
        return [
            s.model_copy(update={"path": str(local(s.path, f"{key}[{i}].path"))})
            if s.is_local or (base / s.path).is_dir()
            else s
            for i, s in enumerate(items)
        ]

    data = recipe.data.model_copy(
        update={
            "train": sources(recipe.data.train, "data.train"),
            "validation": sources(recipe.data.validation, "data.validation"),
        }
    )
    updates["data"] = data
    if problems:
        raise RecipeError(f"{base}: invalid recipe\n" + "\n".join(f"  {p}" for p in problems))
    return recipe.model_copy(update=updates)


def _looks_local(name: str, base: Path) -> bool:
    # Hub ids are `org/name`; an existing path, a .gguf file, or a leading ./ / ~ means a local path.
    return (
        name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1 or (base / name).exists()
    )


# --------------------------------------------------------------------------------------------- messages


def _explain(err: ValidationError, root: type[BaseModel], prefix: str = "") -> str:
    lines = []
    for item in err.errors():
        loc = prefix + ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            known = _known_keys(item["loc"][:-1], root)
            hint = difflib.get_close_matches(str(item["loc"][-1]), known, n=1)
            message = "unknown key" + (f"; did you mean `{hint[0]}`?" if hint else f"; known keys: {', '.join(known)}")
        else:
            message = item["msg"].removeprefix("Value error, ")
        lines.append(f"  {loc}: {message}")
    return "\n".join(lines)


def _known_keys(loc: tuple[Any, ...], root: type[BaseModel]) -> list[str]:
    """The field names of the section at `loc` (walking through lists, tagged unions and optional sections)."""
    annotation: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        sections = _section_types(annotation)
        tagged = [s for s in sections if _kind_tag(s) == part]
        if tagged:  # pydantic names the member of a tagged union by its `kind`
            annotation = tagged[0]
            continue
        owner = next((s for s in sections if part in s.model_fields), None)
        if owner is None:
            return []
        annotation = owner.model_fields[part].annotation
    sections = _section_types(annotation)
    return list(sections[0].model_fields) if len(sections) == 1 else []


def _section_types(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [found for arg in get_args(annotation) for found in _section_types(arg)]


def _kind_tag(section: type[BaseModel]) -> str | None:
    field = section.model_fields.get("kind")
    args = get_args(field.annotation) if field is not None else ()
    return args[0] if len(args) == 1 and isinstance(args[0], str) else None
