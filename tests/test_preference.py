"""DPO (sigmoid, IPO, hinge) on the tiny model: reference = the starting adapter, frozen; one base in memory."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmtune.config import RecipeError, load_recipe
from llmtune.data.formats import RowError, to_preference
from llmtune.data.loading import DataError
from llmtune.train import preference, sft
from tests.helpers import REPO, run_cli, write_recipe

BETA = 0.1


def _pairs(n: int) -> list[dict]:
    return [
        {"prompt": f"Can I take dose {i} of drug {i % 5}?", "chosen": "Please ask your clinician first.",
         "rejected": f"Yes, take {i} tablets now."}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def prefs_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prefs") / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _pairs(40)) + "\n")
    return path


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    """A finished SFT run whose adapter is far from zero (so policy != base at DPO step 0)."""
    folder = tmp_path_factory.mktemp("sft")
    rows = [{"messages": [{"role": "user", "content": f"Can I take dose {i}?"},
                          {"role": "assistant", "content": "Ask a clinician."}]} for i in range(16)]
    (folder / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    recipe = load_recipe(write_recipe(folder, folder / "chat.jsonl", train={"max_steps": 6, "learning_rate": 2e-2}))
    return sft.main(recipe)


def _dpo_recipe(folder: Path, prefs: Path, sft_run: Path | None, **sections) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    base = {
        "method": "dpo",
        "data": {"train": [{"path": str(prefs)}], "validation_fraction": 0.25, "max_length": 128},
        "train": {"max_steps": 12, "batch_size": 4, "learning_rate": 5e-3, "logging_steps": 1},
        "preference": {"beta": BETA, **({"from_run": str(sft_run)} if sft_run else {})},
        **({"adapter": None, "model": None} if sft_run else {}),
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return write_recipe(folder, prefs, **base)


def test_from_run_inherits_the_base_model(tmp_path, prefs_file, sft_run):
    recipe = load_recipe(_dpo_recipe(tmp_path, prefs_file, sft_run))
    assert recipe.model.name_or_path == "builtin:tiny" and recipe.adapter is None
    with pytest.raises(RecipeError, match="not a finished llmtune run"):
        load_recipe(_dpo_recipe(tmp_path, prefs_file, sft_run, preference={"from_run": str(tmp_path)}))
    with pytest.raises(RecipeError, match=r"add an `adapter:` section or `preference\.from_run`"):
        load_recipe(_dpo_recipe(tmp_path, prefs_file, None, adapter=None))


def test_step_zero_policy_equals_reference_when_starting_from_sft(tmp_path, prefs_file, sft_run):
    adapter = load_file(sft_run / "adapter_model.safetensors")
    assert max(t.abs().max().item() for k, t in adapter.items() if "lora_B" in k) > 1e-3  # really non-zero
    session = preference.build_trainer(load_recipe(_dpo_recipe(tmp_path, prefs_file, sft_run)))
    metrics = session.trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert metrics["eval_rewards/chosen"] == pytest.approx(0, abs=1e-5)
    assert metrics["eval_rewards/margins"] == pytest.approx(0, abs=1e-5)


def test_dpo_trains_the_adapter_only_and_preferences_improve_on_held_out_pairs(tmp_path, prefs_file, sft_run):
    session = preference.build_trainer(load_recipe(_dpo_recipe(tmp_path, prefs_file, sft_run)))
    trainer = session.trainer
    model = trainer.model
    assert set(model.peft_config) == {"default", "ref"} and trainer.ref_model is None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    start = trainer.evaluate()
    trainer.train()
    end = trainer.evaluate()

    after = dict(model.named_parameters())
    base = [n for n in before if "lora_" not in n]
    assert all(torch.equal(after[n].detach(), before[n]) for n in base), "base weights changed"
    trained = [n for n in before if ".default." in n and "lora_" in n]
    frozen_ref = [n for n in before if ".ref." in n]
    assert trained and all(not torch.equal(after[n].detach(), before[n]) for n in trained)
    assert frozen_ref and all(torch.equal(after[n].detach(), before[n]) for n in frozen_ref)
    assert end["eval_rewards/accuracies"] > start["eval_rewards/accuracies"]
    assert end["eval_rewards/margins"] > start["eval_rewards/margins"] + 0.1


def test_only_one_copy_of_the_base_weights_is_in_memory(tmp_path, prefs_file, sft_run, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    session = preference.build_trainer(load_recipe(_dpo_recipe(tmp_path, prefs_file, sft_run)))
    trainer = session.trainer
    assert trainer.ref_model is None
    base_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    storages = {}
    for name, param in trainer.model.named_parameters():
        if "lora_" not in name:
            storages[param.untyped_storage().data_ptr()] = param.numel()
    assert sum(storages.values()) == base_params  # every base tensor exactly once, no reference copy


@pytest.mark.parametrize(
    ("loss_type", "expected"),
    [("sigmoid", math.log(2)), ("ipo", (1 / (2 * BETA)) ** 2), ("hinge", 1.0)],
)
def test_each_loss_type_matches_its_formula_at_step_zero(tmp_path, prefs_file, loss_type, expected):
    # From the base with a fresh adapter (B = 0): policy == reference, so the preference logit is 0 and
    # sigmoid: -log(sigmoid(0)) = ln 2, IPO: (0 - 1/(2 beta))^2, hinge: relu(1 - beta * 0) = 1.
    recipe = load_recipe(_dpo_recipe(tmp_path, prefs_file, None, preference={"loss_type": loss_type}))
    session = preference.build_trainer(recipe)
    assert session.trainer.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-5)
    session.trainer.train()
    losses = [r["loss"] for r in session.trainer.state.log_history if "loss" in r]
    assert sum(losses[-3:]) / 3 < expected  # it optimises that loss


def test_sft_weight_adds_the_chosen_answers_mean_nll_to_the_dpo_loss(tmp_path, prefs_file):
    # Fresh adapter: the sigmoid term is ln 2, so the loss is ln 2 + w * (mean NLL of the chosen tokens). Every
    # chosen answer is the same text, so that mean is -logps/chosen (a per-answer sum) over the answer's length.
    weight = 0.5
    one_batch = {"batch_size": 10}  # the 10 held-out pairs in one evaluation batch
    recipe = load_recipe(_dpo_recipe(tmp_path, prefs_file, None, train=one_batch,
                                     preference={"sft_weight": weight}))
    trainer = preference.build_trainer(recipe).trainer
    assert trainer.loss_types == ["sigmoid", "sft"] and trainer.loss_weights == [1.0, weight]
    lengths = {len(row["chosen_ids"]) for row in trainer.eval_dataset}
    assert len(lengths) == 1
    metrics = trainer.evaluate()
    chosen_nll = -metrics["eval_logps/chosen"] / lengths.pop()
    assert chosen_nll > 1  # a random tiny model: the term is far from zero, so the check below can fail
    assert metrics["eval_loss"] == pytest.approx(math.log(2) + weight * chosen_nll, rel=1e-4)


def test_sft_weight_is_only_for_dpo(tmp_path, prefs_file):
    with pytest.raises(RecipeError, match=r"`preference\.sft_weight` applies to `method: dpo` only"):
        load_recipe(_dpo_recipe(tmp_path, prefs_file, None, method="kto", preference={"sft_weight": 1.0}))


def test_dpo_run_writes_an_adapter_with_reward_metrics(tmp_path, prefs_file, sft_run):
    recipe = _dpo_recipe(tmp_path, prefs_file, sft_run)
    result = run_cli("train", str(recipe))
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "run"
    assert (out / "adapter_model.safetensors").is_file() and not (out / "ref").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    steps = [r for r in manifest["train"]["log"] if "rewards/margins" in r]
    assert len(steps) >= 10 and {"rewards/chosen", "rewards/rejected", "rewards/accuracies"} <= set(steps[0])
    assert manifest["data"]["train"]["rows"] == 30 and manifest["data"]["validation"]["rows"] == 10


def test_dpo_two_processes(tmp_path, prefs_file, sft_run):
    recipe = _dpo_recipe(tmp_path, prefs_file, sft_run, train={"batch_size": 2, "max_steps": 4})
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "llmtune", "train", str(recipe)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["world_size"] == 2


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"prompt": "Q", "chosen": "A"}, "missing `rejected`"),
        ({"prompt": "Q", "chosen": "A", "rejected": "A"}, "identical"),
        ({"prompt": "Q", "chosen": "", "rejected": "B"}, "`chosen` is empty"),
        ({"prompt": "", "chosen": "A", "rejected": "B"}, "empty or non-text"),
        ({"chosen": "A", "rejected": "B"}, "missing `prompt`"),
    ],
)
def test_malformed_pairs_say_why(row, reason):
    with pytest.raises(RowError, match=reason):
        to_preference(row, "auto")


def test_implicit_prompt_pairs_are_split():
    convo = [{"role": "user", "content": "Q"}]
    pair = to_preference(
        {"chosen": [*convo, {"role": "assistant", "content": "A"}],
         "rejected": [*convo, {"role": "assistant", "content": "B"}]}, "auto"
    )
    assert pair == {"prompt": convo, "chosen": [{"role": "assistant", "content": "A"}],
                    "rejected": [{"role": "assistant", "content": "B"}]}


def test_bad_pair_rows_strict_names_row_lenient_counts(tmp_path, prefs_file, sft_run):
    rows = _pairs(12)
    rows[4]["rejected"] = rows[4]["chosen"]
    del rows[7]["chosen"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    strict = load_recipe(_dpo_recipe(tmp_path, bad, sft_run))
    with pytest.raises(DataError, match=rf"{bad}: row 5: `chosen` and `rejected` are identical"):
        preference.preference_datasets(strict)
    lenient = load_recipe(_dpo_recipe(tmp_path, bad, sft_run, data={"on_bad_row": "skip"}))
    _, _, report, _ = preference.preference_datasets(lenient)
    assert report["loaded"]["train_files"]["rows_skipped"] == 2 and report["loaded"]["train_files"]["rows_kept"] == 10


def test_dpo_sigkill_then_resume_equals_uninterrupted(tmp_path, prefs_file, sft_run):
    checkpointed = {"train": {"save_steps": 4, "max_steps": 12}}
    reference = run_cli("train", str(_dpo_recipe(tmp_path / "reference", prefs_file, sft_run, **checkpointed)))
    assert reference.returncode == 0, reference.stderr[-3000:]
    recipe = _dpo_recipe(tmp_path / "killed", prefs_file, sft_run, **checkpointed)
    killed = subprocess.run([sys.executable, "-m", "tests.fault_driver", str(recipe), "--sigkill-at-step", "6"],
                            cwd=REPO, capture_output=True, text=True, timeout=600, check=False)
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = run_cli("train", str(recipe))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "checkpoint-4" in resumed.stderr
    expected = load_file(tmp_path / "reference" / "run" / "adapter_model.safetensors")
    got = load_file(tmp_path / "killed" / "run" / "adapter_model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_kto_from_sft_starts_at_its_formula_and_trains(tmp_path, prefs_file, sft_run):
    # Policy == reference at step 0, so every reward is 0 and the KL estimate is 0:
    # loss = 1 - sigmoid(beta * (0 - 0)) = 0.5 for desirable and undesirable answers alike.
    session = preference.build_trainer(load_recipe(_dpo_recipe(tmp_path, prefs_file, sft_run, method="kto")))
    assert session.trainer.ref_model is None and set(session.trainer.model.peft_config) == {"default", "ref"}
    start = session.trainer.evaluate()
    assert start["eval_loss"] == pytest.approx(0.5, abs=1e-5)
    session.trainer.train()
    end = session.trainer.evaluate()
    assert end["eval_loss"] < start["eval_loss"]


def test_orpo_loss_is_nll_minus_weighted_log_odds_and_trains(tmp_path, prefs_file):
    # Equal eval batches (10 held-out pairs, batch 2): the Trainer averages the loss per sample, TRL its metrics
    # per batch, and the two agree only when every batch has the same size.
    recipe = _dpo_recipe(tmp_path, prefs_file, None, method="orpo", train={"batch_size": 2})
    session = preference.build_trainer(load_recipe(recipe))
    trainer = session.trainer
    start = trainer.evaluate()
    # ORPO: L = NLL(chosen) - beta * log sigmoid(log odds(chosen) - log odds(rejected)), no reference model.
    expected = start["eval_nll_loss"] - BETA * start["eval_log_odds_ratio"]
    assert start["eval_loss"] == pytest.approx(expected, rel=1e-5)
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    end = trainer.evaluate()
    assert end["eval_rewards/margins"] > start["eval_rewards/margins"]
    assert all(not torch.equal(p.detach(), lora[n]) for n, p in trainer.model.named_parameters() if "lora_B" in n)


def test_loss_type_is_only_for_dpo(tmp_path, prefs_file):
    with pytest.raises(RecipeError, match=r"`preference\.loss_type` applies to `method: dpo` only"):
        load_recipe(_dpo_recipe(tmp_path, prefs_file, None, method="kto", preference={"loss_type": "ipo"}))


def test_precomputed_reference_log_probs_match_the_live_reference(tmp_path, prefs_file, sft_run):
    recipe = load_recipe(_dpo_recipe(tmp_path, prefs_file, sft_run, preference={"precompute_ref_log_probs": True}))
    session = preference.build_trainer(recipe)
    assert session.trainer.evaluate()["eval_loss"] == pytest.approx(math.log(2), abs=1e-5)
    session.trainer.train()
    losses = [r["loss"] for r in session.trainer.state.log_history if "loss" in r]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4) and losses[-1] < losses[0]


def test_reference_log_probs_are_precomputed_with_the_label_only_head(tmp_path, prefs_file, sft_run, monkeypatch):
    """TRL's DPO computes them inside its constructor, before the head is swapped: they went through TRL's head."""
    from llmtune.train import lm_head

    scored: list[int] = []
    real = lm_head._score_labelled
    monkeypatch.setattr(lm_head, "_score_labelled", lambda head, hidden, targets, *fields: scored.append(len(targets))
                        or real(head, hidden, targets, *fields))
    recipe = load_recipe(_dpo_recipe(tmp_path, prefs_file, sft_run, preference={"precompute_ref_log_probs": True}))
    session = preference.build_trainer(recipe)
    assert scored and "ref_chosen_logps" in session.trainer.train_dataset.column_names
    causal_lm = session.trainer.model.get_base_model()
    forward = causal_lm.forward
    assert lm_head.install_label_only_lm_head(causal_lm) and causal_lm.forward is forward  # installed once
