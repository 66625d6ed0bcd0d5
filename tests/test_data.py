"""Data: the formats users bring, row validation, the loss mask, the chat template, the tokenization cache."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from llmtune.chat_template import ChatTemplateError, training_chat_template
from llmtune.config import load_recipe
from llmtune.data.formats import RowError, to_messages
from llmtune.data.loading import DataError
from llmtune.data.tokenize import prepare_data, tokenize_messages
from tests.helpers import write_recipe

EXPECTED = [
    {"role": "system", "content": "S"},
    {"role": "user", "content": "Q"},
    {"role": "assistant", "content": "A"},
]

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>'"
    " + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt"
    " %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"messages": EXPECTED}, "auto"),
        (
            {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                               {"from": "gpt", "value": "A"}]},
            "auto",
        ),
        ({"instruction": "Q", "input": "", "output": "A", "system": "S"}, "auto"),
        (
            {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}], "completion": "A"},
            "prompt_completion",
        ),
    ],
    ids=["messages", "sharegpt", "alpaca", "prompt-completion"],
)
def test_formats_normalise_to_messages(row, fmt):
    assert to_messages(row, fmt) == EXPECTED


def test_alpaca_input_joins_instruction_and_default_system_is_added():
    messages = to_messages({"instruction": "Translate", "input": "hola", "output": "hello"}, "alpaca", "Be brief.")
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Translate\n\nhola"},
        {"role": "assistant", "content": "hello"},
    ]


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"messages": []}, "no messages"),
        ({"messages": [{"role": "user", "content": "Q"}]}, "last message is not from the assistant"),
        ({"messages": [{"role": "bot", "content": "Q"}]}, "role 'bot'"),
        ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": " "}]}, "empty"),
        ({"text": "hello"}, "cannot tell the format"),
    ],
)
def test_bad_rows_say_why(row, reason):
    with pytest.raises(RowError, match=reason):
        to_messages(row, "auto")


def _bad_file(tmp_path, chat_file):
    lines = chat_file.read_text().splitlines()
    lines[2] = json.dumps({"messages": [{"role": "user", "content": "no answer"}]})
    lines[5] = json.dumps({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ""}]})
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(lines) + "\n")
    return bad


def test_strict_mode_names_file_and_row(tmp_path, chat_file, tiny_tokenizer):
    bad = _bad_file(tmp_path, chat_file)
    recipe = load_recipe(write_recipe(tmp_path, bad, data={"train": [{"path": str(bad)}]}))
    with pytest.raises(DataError, match=rf"{bad}: row 3: the last message is not from the assistant"):
        prepare_data(recipe, tiny_tokenizer, training_chat_template(tiny_tokenizer))


def test_lenient_mode_skips_and_counts_exactly(tmp_path, chat_file, tiny_tokenizer):
    bad = _bad_file(tmp_path, chat_file)
    recipe = load_recipe(write_recipe(tmp_path, bad, data={"train": [{"path": str(bad)}], "on_bad_row": "skip"}))
    prepared = prepare_data(recipe, tiny_tokenizer, training_chat_template(tiny_tokenizer))
    loaded = prepared.report["loaded"]["train_files"]
    assert (loaded["rows_read"], loaded["rows_kept"], loaded["rows_skipped"]) == (24, 22, 2)
    assert loaded["skipped_by_reason"] == {
        "the last message is not from the assistant, so there is nothing to learn at the end": 1,
        "message 1 (assistant)": 1,
    }
    assert len(prepared.train) == 22


def test_invalid_json_line_is_named(tmp_path, chat_file, tiny_tokenizer):
    broken = tmp_path / "broken.jsonl"
    broken.write_text(chat_file.read_text() + "{not json\n")
    recipe = load_recipe(write_recipe(tmp_path, broken, data={"train": [{"path": str(broken)}], "on_bad_row": "skip"}))
    with pytest.raises(DataError, match=rf"{broken}: row 25: invalid JSON"):
        prepare_data(recipe, tiny_tokenizer, None)


@pytest.mark.parametrize("suffix", [".json", ".csv", ".parquet"])
def test_other_file_types_load_the_same_rows(tmp_path, chat_file, tiny_tokenizer, suffix):
    rows = [json.loads(line) for line in chat_file.read_text().splitlines()]
    alpaca = [{"instruction": r["messages"][1]["content"], "output": r["messages"][2]["content"]} for r in rows]
    path = tmp_path / f"data{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(alpaca))
    elif suffix == ".csv":
        pd.DataFrame(alpaca).to_csv(path, index=False)
    else:
        pd.DataFrame(rows).to_parquet(path)
    recipe = load_recipe(write_recipe(tmp_path, path))
    prepared = prepare_data(recipe, tiny_tokenizer, training_chat_template(tiny_tokenizer))
    assert len(prepared.train) == 24


CONVERSATION = [
    {"role": "system", "content": "You are careful."},
    {"role": "user", "content": "What class is metformin?"},
    {"role": "assistant", "content": "A biguanide."},
    {"role": "user", "content": "First-line for?"},
    {"role": "assistant", "content": "Type 2 diabetes."},
]


def _prompt_ids(tokenizer, template, messages) -> list[int]:
    encoded = tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, tokenize=True, return_dict=True
    )
    return list(encoded["input_ids"])


def _assistant_spans(tokenizer, template, messages):
    """Token spans of each assistant turn (content + end-of-turn), found independently by rendering prefixes."""
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = len(_prompt_ids(tokenizer, template, messages[:index]))
        body = tokenizer.encode(message["content"] + tokenizer.eos_token, add_special_tokens=False)
        spans.append(range(start, start + len(body)))
    return spans


def test_loss_mask_trains_exactly_the_assistant_turns_with_end_of_turn(tiny_tokenizer):
    template = training_chat_template(tiny_tokenizer)
    ids, labels, _ = tokenize_messages(tiny_tokenizer, CONVERSATION, template, "assistant", None)
    trained = {i for span in _assistant_spans(tiny_tokenizer, template, CONVERSATION) for i in span}
    eos = tiny_tokenizer.eos_token_id
    assert sum(1 for t in ids if t == eos) == 5  # one end-of-turn per message
    for position, (token, label) in enumerate(zip(ids, labels, strict=True)):
        assert label == (token if position in trained else -100), position
    trained_eos = [p for p in trained if ids[p] == eos]
    assert len(trained_eos) == 2  # the end-of-turn of both assistant turns is trained


def test_generation_prompt_is_a_token_prefix_of_training_ids(tiny_tokenizer):
    template = training_chat_template(tiny_tokenizer)
    ids, _, _ = tokenize_messages(tiny_tokenizer, CONVERSATION, template, "assistant", None)
    prompt = _prompt_ids(tiny_tokenizer, template, CONVERSATION[:-1])
    assert len(prompt) > 10 and ids[: len(prompt)] == prompt


def test_loss_on_all_trains_every_token(tiny_tokenizer):
    ids, labels, _ = tokenize_messages(tiny_tokenizer, CONVERSATION, None, "all", None)
    assert labels == ids


def test_truncation_that_removes_every_answer_is_reported(tiny_tokenizer):
    template = training_chat_template(tiny_tokenizer)
    with pytest.raises(RowError, match=r"no trainable tokens \(after truncation to max_length=8\)"):
        tokenize_messages(tiny_tokenizer, CONVERSATION, template, "assistant", 8)


def test_zero_trainable_rows_are_skipped_and_counted(tmp_path, chat_file, tiny_tokenizer):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 300}, {"role": "assistant", "content": "ok"}]}
    path = tmp_path / "long.jsonl"
    path.write_text(chat_file.read_text() + json.dumps(long_prompt) + "\n")
    template = training_chat_template(tiny_tokenizer)
    strict = load_recipe(write_recipe(tmp_path, path))
    with pytest.raises(DataError, match=rf"{path}: row 25: no trainable tokens"):
        prepare_data(strict, tiny_tokenizer, template)
    lenient = load_recipe(write_recipe(tmp_path, path, data={"train": [{"path": str(path)}], "on_bad_row": "skip"}))
    prepared = prepare_data(lenient, tiny_tokenizer, template)
    assert prepared.report["train"]["rows"] == 24 and prepared.report["train"]["rows_skipped"] == 1


def test_template_without_markers_gets_an_identical_training_variant(tiny_tokenizer):
    tokenizer = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.chat_template = SMOLLM2_TEMPLATE
    template = training_chat_template(tokenizer)
    assert "{% generation %}" in template
    messages = CONVERSATION[1:]  # no system message: SmolLM2 injects its default one
    assert tokenizer.apply_chat_template(messages, tokenize=False) == tokenizer.apply_chat_template(
        messages, tokenize=False, chat_template=template
    )
    _ids, labels, _ = tokenize_messages(tokenizer, messages, template, "assistant", None)
    assert tokenizer.decode([t for t in labels if t != -100]) == "A biguanide.<|im_end|>Type 2 diabetes.<|im_end|>"


def test_unknown_template_without_markers_is_refused(tiny_tokenizer):
    tokenizer = tiny_tokenizer.__class__.from_pretrained(tiny_tokenizer.name_or_path)
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ChatTemplateError, match=r"data\.loss_on: all"):
        training_chat_template(tokenizer)


def test_tokenization_is_cached_and_invalidated_by_the_template(tmp_path, chat_file, tiny_tokenizer, monkeypatch):
    data = {"train": [{"path": str(chat_file)}], "validation_fraction": 0.25}
    recipe = load_recipe(write_recipe(tmp_path, chat_file, data=data))
    template = training_chat_template(tiny_tokenizer)
    first = prepare_data(recipe, tiny_tokenizer, template)
    assert not first.from_cache and (len(first.train), len(first.validation)) == (18, 6)

    calls = []
    monkeypatch.setattr("llmtune.data.tokenize.tokenize_messages", lambda *a, **k: calls.append(1))
    again = prepare_data(recipe, tiny_tokenizer, template)
    assert again.from_cache and calls == []  # nothing re-tokenized
    assert again.train["input_ids"] == first.train["input_ids"]

    monkeypatch.undo()
    changed = prepare_data(recipe, tiny_tokenizer, template.replace("<|im_start|>", "<|im_start|> "))
    assert not changed.from_cache and changed.cache_path != first.cache_path
    edited = tmp_path / "edited.jsonl"
    edited.write_text(chat_file.read_text().replace("Item 3 ", "Item three "))
    data = {"train": [{"path": str(edited)}], "validation_fraction": 0.25}
    other = load_recipe(write_recipe(tmp_path, edited, data=data))
    assert not prepare_data(other, tiny_tokenizer, template).from_cache


def test_dataset_folder_loads_through_datasets(tmp_path, chat_file, tiny_tokenizer):
    folder = tmp_path / "my-dataset"
    folder.mkdir()
    (folder / "train.jsonl").write_text(chat_file.read_text())
    recipe = load_recipe(write_recipe(tmp_path, chat_file, data={"train": [{"path": "my-dataset"}]}))
    assert recipe.data.train[0].path == str(folder)  # resolved against the recipe's folder
    prepared = prepare_data(recipe, tiny_tokenizer, training_chat_template(tiny_tokenizer))
    assert len(prepared.train) == 24 and len(prepared.sources[0]["sha256"]) == 64


def test_hub_dataset_offline_fails_naming_the_dataset(tmp_path, chat_file, tiny_tokenizer):
    recipe = load_recipe(write_recipe(tmp_path, chat_file, data={"train": [{"path": "no-org/no-such-dataset"}]}))
    with pytest.raises(DataError, match="no-org/no-such-dataset: cannot load hub dataset"):
        prepare_data(recipe, tiny_tokenizer, None)
