"""Freezing strategies on a four-block tiny Llama (CPU): LoRA on chosen blocks, full fine-tuning of the last
blocks, and gradual unfreezing, checked block by block after every optimizer step."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback, TrainerState

from llmtune.config import AdapterSection, FreezeSection, GradualUnfreezing, RecipeError, load_recipe
from llmtune.train import freezing, sft
from llmtune.train.adapters import lora_config
from llmtune.train.blocks import parameter_blocks
from tests.helpers import write_recipe

Weights = dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def four_blocks(tmp_path_factory, tiny_model_dir) -> Path:
    """The builtin tiny model with four random blocks instead of two (same tokenizer)."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("four-blocks")
    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers = 4
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return folder


def _session(folder: Path, chat_file: Path, model: Path, **sections) -> sft.runner.Session:
    folder.mkdir(parents=True, exist_ok=True)
    recipe = write_recipe(folder, chat_file, model={"name_or_path": str(model)}, **sections)
    return sft.build_trainer(load_recipe(recipe))


def _weights(model: torch.nn.Module) -> Weights:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


class Snapshots(TrainerCallback):
    """`states[k]`: every parameter after k optimizer steps (k = 0: before training)."""

    def __init__(self, model: torch.nn.Module):
        self.model, self.states = model, [_weights(model)]

    def on_step_end(self, args, state, control, **kwargs):
        self.states.append(_weights(self.model))


def _changed(before: Weights, after: Weights, names: list[str]) -> list[str]:
    return [n for n in names if not torch.equal(before[n], after[n])]


def _assert_unfreezes_on_schedule(states: list[Weights], blocks: dict[str, int | None], trained: list[str],
                                  unfrozen_after: dict[int, int]) -> None:
    """Each block's trained tensors are bit-identical to the start until `unfrozen_after[block]` steps are done,
    then every one of them changes at every step; nothing else ever changes."""
    for block, start in unfrozen_after.items():
        names = [n for n in trained if blocks[n] == block]
        assert names, f"block {block} has nothing to train"
        for step in range(1, len(states)):
            if step <= start:
                assert not _changed(states[0], states[step], names), f"block {block} moved at step {step}"
            else:
                kept = set(names) - set(_changed(states[step - 1], states[step], names))
                assert not kept, f"block {block}, step {step}: unchanged {sorted(kept)}"
    frozen = [n for n in states[0] if n not in trained]
    assert frozen and not _changed(states[0], states[-1], frozen)


def _gradual(every: int, unit: str = "steps", start_blocks: int = 1) -> dict:
    return {"gradual": {"every": every, "unit": unit, "start_blocks": start_blocks, "blocks_per_phase": 1}}


# --------------------------------------------------------------------------------------------- training


def test_lora_on_chosen_blocks_only(tmp_path, chat_file, four_blocks):
    session = _session(tmp_path, chat_file, four_blocks, adapter={"r": 4, "alpha": 8, "dropout": 0.0,
                                                                   "layers": [0, -1]}, train={"max_steps": 3})
    model = session.trainer.model
    blocks = parameter_blocks(model)
    lora = [n for n in blocks if "lora_" in n]
    assert {blocks[n] for n in lora} == {0, 3}
    assert model.peft_config["default"].layers_to_transform == [0, 3]
    before = _weights(model)
    session.trainer.train()
    after = _weights(model)
    assert sorted(_changed(before, after, lora)) == sorted(lora)  # every LoRA matrix moved
    assert not _changed(before, after, [n for n in before if "lora_" not in n])


def test_train_last_blocks_is_full_fine_tuning_of_those_blocks(tmp_path, chat_file, four_blocks, caplog):
    with caplog.at_level(logging.INFO, logger="llmtune.freeze"):
        session = _session(tmp_path, chat_file, four_blocks, adapter=None, freeze={"train_last_blocks": 1},
                           train={"max_steps": 3})
    model = session.trainer.model
    blocks = parameter_blocks(model)
    last = [n for n, b in blocks.items() if b == 3]
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == sorted(last)
    assert "freeze: training block 3: 9 tensors" in caplog.text
    before = _weights(model)
    session.trainer.train()
    after = _weights(model)
    assert sorted(_changed(before, after, last)) == sorted(last)
    others = [n for n in before if n not in last]
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= set(others)
    assert not _changed(before, after, others)  # other blocks, embeddings, final norm, LM head: bit-identical


def test_gradual_unfreezing_of_lora_blocks_and_resume(tmp_path, chat_file, four_blocks, caplog):
    """Every 2 steps one more block's LoRA weights train, from the last one. Weight decay is on, so a block
    that AdamW touched before its phase would move. A run resumed at step 3 (inside phase 1) ends equal."""
    sections = dict(adapter={"r": 4, "alpha": 8, "dropout": 0.0}, freeze=_gradual(every=2),
                    train={"max_steps": 8, "weight_decay": 0.1, "save_steps": 3, "save_total_limit": 4,
                           "lr_scheduler": "constant"})
    with caplog.at_level(logging.INFO, logger="llmtune.freeze"):
        session = _session(tmp_path / "a", chat_file, four_blocks, **sections)
        trainer = session.trainer
        snapshots = Snapshots(trainer.model)
        trainer.add_callback(snapshots)
        trainer.train()
    blocks = parameter_blocks(trainer.model)
    lora = [n for n in blocks if "lora_" in n]
    _assert_unfreezes_on_schedule(snapshots.states, blocks, lora, {3: 0, 2: 2, 1: 4, 0: 6})
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for n, p in trainer.model.named_parameters() if "lora_" in n}

    per_block = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" in n and blocks[n] == 3)
    phases = freezing.phase_record(trainer)
    assert phases == [{"phase": p, "step": 2 * p, "blocks": list(range(3 - p, 4)),
                       "trainable_parameters": (p + 1) * per_block} for p in range(4)]
    assert f"gradual unfreezing phase 1 from step 2: blocks 2-3: 28 tensors, {2 * per_block:,} parameters" \
        in caplog.text

    resumed = _session(tmp_path / "b", chat_file, four_blocks, **sections).trainer
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "run" / "checkpoint-3"))
    final = _weights(resumed.model)
    assert not _changed(final, snapshots.states[-1], list(final)), "the resumed run differs from the uninterrupted one"
    assert freezing.phase_record(resumed) == phases  # the record of phases 0-1 came back with the checkpoint


def test_gradual_unfreezing_in_full_fine_tuning_by_epochs(tmp_path, chat_file, four_blocks):
    """3 steps per epoch; blocks 2-3 train first, one more block each epoch; embeddings, norm, head never."""
    session = _session(tmp_path, chat_file, four_blocks, adapter=None,
                       freeze=_gradual(every=1, unit="epochs", start_blocks=2),
                       train={"epochs": 3, "batch_size": 8, "weight_decay": 0.1, "lr_scheduler": "constant"})
    trainer = session.trainer
    snapshots = Snapshots(trainer.model)
    trainer.add_callback(snapshots)
    trainer.train()
    assert len(snapshots.states) == 10
    blocks = parameter_blocks(trainer.model)
    in_blocks = [n for n, b in blocks.items() if b is not None]
    _assert_unfreezes_on_schedule(snapshots.states, blocks, in_blocks, {3: 0, 2: 0, 1: 3, 0: 6})
    assert [(r["step"], r["blocks"]) for r in freezing.phase_record(trainer)] == [(0, [2, 3]), (3, [1, 2, 3]),
                                                                                  (6, [0, 1, 2, 3])]


# --------------------------------------------------------------------------------------------- units


@pytest.fixture(scope="module")
def small_config(tiny_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.num_hidden_layers, config.num_labels = 4, 3
    return config


def test_adapter_layers_out_of_range_name_the_key(small_config):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(small_config)
    assert lora_config(AdapterSection(layers=[-4, 3]), model).layers_to_transform == [0, 3]
    for wrong in (4, -5):
        with pytest.raises(RecipeError, match=rf"adapter.layers: block {wrong} does not exist: the model has 4"):
            lora_config(AdapterSection(layers=[0, wrong]), model)


def test_phase_follows_steps_or_epochs_so_resume_lands_in_its_phase():
    steps, epochs = GradualUnfreezing(every=3), GradualUnfreezing(every=2, unit="epochs")
    assert [freezing.phase_at(steps, TrainerState(global_step=s)) for s in (0, 2, 3, 8, 9)] == [0, 0, 1, 2, 3]
    assert [freezing.phase_at(epochs, TrainerState(global_step=99, epoch=e)) for e in (0, 1.9, 2.0, 3.5, 4)] == \
        [0, 0, 1, 1, 2]


def test_phases_are_capped_and_the_classification_head_always_trains(small_config):
    from transformers import LlamaForSequenceClassification

    model = LlamaForSequenceClassification(small_config)
    gradual = GradualUnfreezing(every=1, start_blocks=1, blocks_per_phase=2)
    plan = freezing.freeze_plan(model, FreezeSection(gradual=gradual), freezing.HEADS)
    assert [freezing.blocks_in_phase(plan, gradual, p) for p in range(4)] == [range(3, 4), range(1, 4),
                                                                             range(0, 4), range(0, 4)]
    names = plan.train_only(range(3, 4))
    assert "score.weight" in names and "model.embed_tokens.weight" not in names
    assert plan.describe(range(3, 4), names).startswith("block 3 (+ score): 10 tensors")

    last = freezing.freeze_plan(model, FreezeSection(train_last_blocks=2), freezing.HEADS)
    trained = last.train_only(last.allowed)
    assert {plan.blocks[n] for n in trained} == {None, 2, 3} and "score.weight" in trained
    assert last.last_blocks(4) == range(2, 4)  # gradual unfreezing never goes below `train_last_blocks`


def test_peft_modules_to_save_train_from_the_first_phase(small_config):
    from peft import get_peft_model
    from transformers import LlamaForSequenceClassification

    model = get_peft_model(LlamaForSequenceClassification(small_config),
                           lora_config(AdapterSection(r=2, modules_to_save=["score"]), task_type="SEQ_CLS"))
    plan = freezing.freeze_plan(model, FreezeSection(gradual=GradualUnfreezing(every=1)), frozenset())
    names = plan.train_only(range(3, 4))
    assert {plan.blocks[n] for n in names} == {None, 3}
    assert [n for n in names if plan.blocks[n] is None] == ["base_model.model.score.modules_to_save.default.weight"]
    assert plan.describe(range(3, 4), names).startswith("block 3 (+ score): ")
    with plan.everything_trainable():
        assert {plan.blocks[n] for n, p in model.named_parameters() if p.requires_grad} == {None, 0, 1, 2, 3}
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == names


def test_gradual_unfreezing_refuses_several_processes(tmp_path, chat_file, monkeypatch, small_config):
    from transformers import LlamaForCausalLM

    recipe = load_recipe(write_recipe(tmp_path, chat_file, adapter=None, freeze=_gradual(every=1)))
    monkeypatch.setattr(freezing, "process_state", lambda: SimpleNamespace(num_processes=2))
    with pytest.raises(freezing.FreezeError, match="one process, not 2: DDP fixes the parameters"):
        freezing.prepare(recipe, LlamaForCausalLM(small_config))


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1, foreach=False),
    lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1, foreach=True),
    lambda ps: torch.optim.AdamW(ps, lr=0.1, weight_decay=0.1, fused=True),
    lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.1),
], ids=["adamw", "adamw-foreach", "adamw-fused", "sgd"])
def test_optimizers_leave_parameters_without_gradient_alone(make):
    """What gradual unfreezing relies on: a parameter in the optimizer whose grad is None is not stepped, not
    decayed, and gets no state until its first gradient."""
    trained, waiting = torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))
    optimizer = make([trained, waiting])
    for _ in range(3):
        optimizer.zero_grad()  # set_to_none, as the Trainer's model.zero_grad()
        trained.grad = torch.full((4,), 0.5)
        optimizer.step()
    assert not torch.equal(trained.detach(), torch.ones(4))
    assert torch.equal(waiting.detach(), torch.ones(4)) and not optimizer.state[waiting]
    waiting.grad = torch.full((4,), 0.5)
    optimizer.step()
    assert not torch.equal(waiting.detach(), torch.ones(4))


def test_the_run_manifest_records_the_unfreezing_phases(tmp_path, chat_file, four_blocks):
    import json

    recipe = write_recipe(tmp_path, chat_file, model={"name_or_path": str(four_blocks)},
                          freeze={"gradual": {"every": 2, "start_blocks": 2, "blocks_per_phase": 1}},
                          train={"max_steps": 5, "batch_size": 4, "learning_rate": 5e-3, "warmup_ratio": 0.0})
    out = sft.main(load_recipe(recipe))

    phases = json.loads((out / "manifest.json").read_text())["train"]["freeze_phases"]
    assert [(p["step"], p["blocks"]) for p in phases] == [(0, [2, 3]), (2, [1, 2, 3]), (4, [0, 1, 2, 3])]
    assert phases[0]["trainable_parameters"] < phases[1]["trainable_parameters"] < phases[2]["trainable_parameters"]
