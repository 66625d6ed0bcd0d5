"""`task: classification` on the tiny model: a new head + LoRA beats the majority class on held-out rows, the run
folder reloads and predicts identically, the head is trained in full and saved with the adapter, and `llmtune
eval` reports accuracy, macro F1 and a confusion matrix."""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmtune.config import load_recipe
from llmtune.data.loading import DataError
from llmtune.inference.classifier import Classifier, load_classifier
from llmtune.train import classification
from tests.helpers import REPO, run_cli, write_recipe

LABELS = ["dose", "asthma", "fox"]
# Separable: each label has its own keywords, at the end of the text (the head reads the last token).
KEYWORDS = {"dose": ["metformin", "warfarin"], "asthma": ["asthma", "salbutamol"], "fox": ["fox", "dog"]}
OPENINGS = ["What about the", "Tell me of the", "A question on", "Please explain", "Hello, how is the", "Quick note:"]
HEAD = "base_model.model.score.weight"  # the head's key in adapter_model.safetensors


def _rows(counts: dict[str, int], seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = [{"text": f"{rng.choice(OPENINGS)} {rng.choice(KEYWORDS[label])}", "label": label}
            for label, count in counts.items() for _ in range(count)]
    rng.shuffle(rows)
    return rows


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _recipe(folder: Path, train_file: Path, validation_file: Path | None = None, **sections) -> Path:
    data = {"train": [{"path": str(train_file)}], "max_length": 32}
    if validation_file is not None:
        data["validation"] = [{"path": str(validation_file)}]
    # fp32 unless a test says otherwise: after bf16 training accelerate leaves autocast on the in-memory forward
    train = {"epochs": 4, "batch_size": 8, "precision": "fp32"} | sections.pop("train", {})
    sections = {"task": "classification", "classification": {"labels": LABELS}, "data": data, "train": train} | sections
    return write_recipe(folder, train_file, **sections)


def _head(model) -> torch.Tensor:
    """The trainable copy of the head that PEFT's `modules_to_save` wraps."""
    return model.base_model.model.score.modules_to_save["default"].weight


@dataclass
class Trained:
    run: Path
    session: object  # runner.Session: the in-memory model after training
    initial_head: torch.Tensor
    validation: list[dict[str, str]]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Trained:
    """One run: 60 training rows (60% `dose`), 20 held-out rows with the same imbalance."""
    folder = tmp_path_factory.mktemp("classifier")
    train = _write(folder / "train.jsonl", _rows({"dose": 36, "asthma": 12, "fox": 12}, seed=0))
    validation = _rows({"dose": 12, "asthma": 4, "fox": 4}, seed=1)
    recipe = load_recipe(_recipe(folder, train, _write(folder / "validation.jsonl", validation)))
    seen = {}
    original = classification.build_trainer

    def build(recipe):
        session = original(recipe)
        seen["session"] = session
        seen["head"] = _head(session.trainer.model).detach().clone()
        return session

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(classification, "build_trainer", build)
        run = classification.main(recipe)
    return Trained(run, seen["session"], seen["head"], validation)


def _in_memory(trained: Trained) -> Classifier:
    return Classifier(trained.session.trainer.model, trained.session.tokenizer, LABELS, max_length=32)


def test_head_and_lora_beat_the_majority_class(trained):
    texts, gold = [r["text"] for r in trained.validation], [r["label"] for r in trained.validation]
    majority = max(gold.count(label) for label in LABELS) / len(gold)
    predicted = load_classifier(trained.run).predict(texts)
    accuracy = sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold)
    assert majority == 0.6 and accuracy >= 0.9 > majority, (accuracy, predicted)

    manifest = json.loads((trained.run / "manifest.json").read_text())
    assert manifest["data"]["train"]["label_counts"] == {"dose": 36, "asthma": 12, "fox": 12}
    evaluations = [r for r in manifest["train"]["log"] if "eval_accuracy" in r]
    assert len(evaluations) >= 4 and all(0 <= r["eval_f1"] <= 1 for r in evaluations)  # one per epoch
    assert evaluations[-1]["eval_accuracy"] == accuracy


def test_saved_run_reloads_and_predicts_identically(trained):
    texts = [r["text"] for r in trained.validation] + ["an unseen text about nothing at all, quite a bit longer"]
    loaded = load_classifier(trained.run)
    assert loaded.labels == LABELS and loaded.model.config.id2label == dict(enumerate(LABELS))
    expected = _in_memory(trained).logits(texts, batch_size=4)
    torch.testing.assert_close(loaded.logits(texts, batch_size=5), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(loaded.logits(texts[:1], batch_size=1), expected[:1], atol=1e-5, rtol=0)  # no padding


def test_head_trains_in_full_and_is_saved_with_the_adapter(trained):
    config = json.loads((trained.run / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    saved = load_file(trained.run / "adapter_model.safetensors")
    assert saved[HEAD].shape == (len(LABELS), 64) and not any("score.lora" in key for key in saved)
    assert (saved[HEAD] != trained.initial_head).all()  # every weight of the head trained, not a low-rank update
    assert abs(trained.initial_head.std().item() - 0.02) < 0.005  # initialised N(0, 0.02²)
    assert _head(trained.session.trainer.model).requires_grad


def test_a_classification_run_is_refused_where_an_lm_head_is_needed(trained, tmp_path):
    from llmtune.inference.loading import InferenceLoadError, load_for_inference
    from llmtune.merge import MergeError, merge_run

    with pytest.raises(InferenceLoadError, match="is a classification run"):
        load_for_inference(str(trained.run))
    with pytest.raises(MergeError, match="classification run"):
        merge_run(trained.run, tmp_path / "merged")


def test_zero_head_starts_every_label_equal_and_stays_fp32_on_a_bf16_base(tmp_path):
    train = _write(tmp_path / "train.jsonl", _rows({"dose": 4, "asthma": 2, "fox": 2}, seed=0))
    recipe = load_recipe(_recipe(tmp_path, train, classification={"labels": LABELS, "head_init": "zeros"},
                                 train={"precision": "bf16"}))
    session = classification.build_trainer(recipe)
    model = session.trainer.model
    assert _head(model).dtype == torch.float32 and model.get_input_embeddings().weight.dtype == torch.bfloat16
    logits = Classifier(model, session.tokenizer, LABELS).logits(["a dose of metformin", "fox"])  # no autocast
    assert logits.shape == (2, 3) and torch.equal(logits, torch.zeros(2, 3))


def test_frozen_blocks_and_lora_on_chosen_blocks_keep_the_head_training(tmp_path):
    train = _write(tmp_path / "train.jsonl", _rows({"dose": 4, "asthma": 2, "fox": 2}, seed=0))
    frozen = classification.build_trainer(load_recipe(_recipe(tmp_path, train, adapter=None,
                                                              freeze={"train_last_blocks": 1})))
    trainable = {n for n, p in frozen.trainer.model.named_parameters() if p.requires_grad}
    blocks = trainable - {"score.weight"}
    assert "score.weight" in trainable and blocks and all(n.startswith("model.layers.1.") for n in blocks)
    chosen = classification.build_trainer(load_recipe(_recipe(tmp_path, train, adapter={"r": 4, "layers": [1]})))
    trainable = {n for n, p in chosen.trainer.model.named_parameters() if p.requires_grad}
    lora = [n for n in trainable if "lora_" in n]
    assert _head(chosen.trainer.model).requires_grad and lora and all("layers.1." in n for n in lora)


def test_a_label_outside_the_set_names_file_row_and_labels(tmp_path, tiny_tokenizer):
    from llmtune.data.classification import prepare_classification_data

    rows = _rows({"dose": 3, "asthma": 1, "fox": 1}, seed=0)
    rows[2] = {"text": "a cat", "label": "cat"}
    train = _write(tmp_path / "train.jsonl", rows)
    with pytest.raises(DataError) as caught:
        prepare_classification_data(load_recipe(_recipe(tmp_path, train)), tiny_tokenizer)
    assert f"{train}: row 3: label 'cat' (`label`) is not one of the labels: dose, asthma, fox" in str(caught.value)

    skipping = load_recipe(_recipe(tmp_path, train, data={"train": [{"path": str(train)}], "on_bad_row": "skip"}))
    data = prepare_classification_data(skipping, tiny_tokenizer)
    assert len(data.train) == 4 and data.report["loaded"]["train_files"]["rows_skipped"] == 1


def test_eval_reports_accuracy_f1_and_confusion_matrix_and_publish_names_the_labels(trained, tmp_path):
    from llmtune.eval.recipe import EvalSection
    from llmtune.eval.run import evaluate
    from llmtune.publish import build_publish_folder
    from tests.test_eval import _validate_against_schema

    items = _write(tmp_path / "items.jsonl", [{"id": f"v{i}", **row} for i, row in enumerate(trained.validation)])
    section = EvalSection(output_dir=tmp_path / "eval", models=[{"name": "first", "path": str(trained.run)},
                                                               {"name": "again", "path": str(trained.run)}],
                          tasks=[{"name": "keywords", "kind": "classification", "path": items}], bootstrap=100)
    report = evaluate(section)
    _validate_against_schema(report)
    result = report["results"]["keywords"]["first"]
    summary = result["classification"]
    assert summary["labels"] == sorted(LABELS)
    assert sum(map(sum, summary["confusion_matrix"])) == result["items"] == 20
    predicted = load_classifier(trained.run).predict([r["text"] for r in trained.validation])
    right = sum(p == r["label"] for p, r in zip(predicted, trained.validation, strict=True))
    assert result["metrics"]["acc"]["mean"] == right / 20
    assert sum(summary["confusion_matrix"][i][i] for i in range(3)) == right and 0 < summary["f1_macro"] <= 1
    assert report["comparisons"]["keywords"]["again"][0]["test"] == "mcnemar_exact"  # the same model: no difference
    markdown = (tmp_path / "eval" / "report.md").read_text()
    assert "## Confusion matrix: keywords · first" in markdown and "| keywords | first | f1_macro |" in markdown
    assert (tmp_path / "eval" / "plots" / "keywords-first-confusion.png").is_file()

    published = build_publish_folder(trained.run, tmp_path / "publish", eval_report=tmp_path / "eval" / "report.json",
                                     eval_model="first")
    card = (published / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "`dose`, `asthma`, `fox`" in card
    assert "AutoModelForSequenceClassification" in card and "f1_macro" in card
    assert HEAD in load_file(published / "adapter_model.safetensors")


def test_full_fine_tuning_saves_a_reloadable_classifier(tmp_path):
    train = _write(tmp_path / "train.jsonl", _rows({"dose": 6, "asthma": 3, "fox": 3}, seed=0))
    seen = {}
    original = classification.build_trainer

    def build(recipe):
        seen["session"] = original(recipe)
        return seen["session"]

    recipe = load_recipe(_recipe(tmp_path, train, adapter=None, train={"max_steps": 3, "batch_size": 4}))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(classification, "build_trainer", build)
        run = classification.main(recipe)
    assert (run / "model.safetensors").is_file() and not (run / "adapter_config.json").exists()
    texts = ["a dose of warfarin", "the quick brown fox"]
    expected = Classifier(seen["session"].trainer.model, seen["session"].tokenizer, LABELS, 32).logits(texts)
    torch.testing.assert_close(load_classifier(run).logits(texts), expected, atol=1e-5, rtol=0)


def test_an_interrupted_run_resumes_to_the_same_head_and_adapter(tmp_path):
    train = _write(tmp_path / "train.jsonl", _rows({"dose": 8, "asthma": 4, "fox": 4}, seed=0))
    recipe = load_recipe(_recipe(tmp_path, train, train={"max_steps": 4, "batch_size": 4, "save_steps": 2}))
    run = classification.main(recipe)
    uninterrupted = load_file(run / "adapter_model.safetensors")
    # As if killed after the checkpoint at step 2: no manifest, no later checkpoint.
    (run / "manifest.json").unlink()
    shutil.rmtree(run / "checkpoint-4")
    assert classification.main(recipe, resume="require") == run
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["train"]["resumed_from"].endswith("checkpoint-2") and manifest["train"]["steps"] == 4
    resumed = load_file(run / "adapter_model.safetensors")
    assert resumed.keys() == uninterrupted.keys() and HEAD in resumed
    assert all(torch.equal(resumed[key], uninterrupted[key]) for key in resumed)


def test_shipped_triage_recipe_trains_and_evaluates(tmp_path):
    out = tmp_path / "triage"
    result = run_cli("train", str(REPO / "recipes" / "clinical-qa" / "triage-tiny.yaml"),
                     "--set", f"output_dir={out}", "--set", "train.epochs=1")
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["data"]["train"]["rows"] == 64 and manifest["data"]["validation"]["rows"] == 16
    assert any("eval_f1" in r for r in manifest["train"]["log"])

    from llmtune.eval.recipe import load_eval_recipe
    from llmtune.eval.run import evaluate

    section = load_eval_recipe(REPO / "recipes" / "clinical-qa" / "eval-triage-tiny.yaml",
                               [f"eval.models.0.path={out}", f"eval.output_dir={tmp_path / 'eval'}"])
    summary = evaluate(section)["results"]["triage"]["triage"]["classification"]
    assert summary["labels"] == ["diagnosis", "emergency", "lifestyle", "medication"]
    assert sum(map(sum, summary["confusion_matrix"])) == 16
