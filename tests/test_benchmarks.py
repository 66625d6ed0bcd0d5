"""The benchmarks' shared parts: the child's measured peaks, and random weights of a real architecture (the GPU mode
trains `random:meta-llama/Llama-3.1-8B-Instruct`; here the same code builds the tiny architecture)."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from common import random_model_folder, timed


def test_timed_reports_the_child_s_own_peak_rss_and_output():
    allocate = "import sys; block = bytearray(300 * 2**20); block[::4096] = b'x' * len(block[::4096]); print('done')"
    run = timed([sys.executable, "-c", allocate], env={})
    assert run.stdout.strip() == "done"
    assert 300 < run.peak_rss_mb < 1000  # the child's peak, not this test process's
    if not torch.cuda.is_available():
        assert run.peak_gpu_mb is None  # no NVIDIA GPU here: RSS only


def test_timed_stops_with_the_failing_command_s_error():
    with pytest.raises(SystemExit, match="no such thing"):
        timed([sys.executable, "-c", "raise SystemExit('no such thing')"], env={})


def test_random_model_folder_has_the_architecture_random_weights_and_the_tokenizer():
    from transformers import AutoConfig, AutoTokenizer

    from llmtune.builtin_models import ensure_builtin

    tiny = ensure_builtin("tiny")
    folder = random_model_folder("builtin:tiny", tokenizer="builtin:tiny")

    config, reference = AutoConfig.from_pretrained(folder), AutoConfig.from_pretrained(tiny)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        assert getattr(config, key) == getattr(reference, key), key
    weights, original = load_file(folder / "model.safetensors"), load_file(tiny / "model.safetensors")
    assert weights.keys() == original.keys()
    assert all(weights[k].dtype == torch.bfloat16 for k in weights)
    name = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(weights[name].float(), original[name].float())  # new weights, not a copy
    assert AutoTokenizer.from_pretrained(folder).chat_template == AutoTokenizer.from_pretrained(tiny).chat_template

    built = (folder / "model.safetensors").stat().st_mtime_ns
    assert random_model_folder("builtin:tiny", tokenizer="builtin:tiny") == folder  # cached, not rebuilt
    assert (folder / "model.safetensors").stat().st_mtime_ns == built


def test_an_unknown_architecture_is_named_in_the_error():
    with pytest.raises(SystemExit, match=r"random:acme/Unknown-7B: not a model folder nor one of .*Llama-3\.1-8B"):
        random_model_folder("acme/Unknown-7B", tokenizer="builtin:tiny")
