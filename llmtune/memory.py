"""Training memory estimate from an architecture's shape, with no download and no accelerator.

The model is built on the meta device (shapes only) from its config, which comes from a local folder or, for the
families our GPU recipes use, from the published config values below. The estimate per process:

  weights      quantized linear layers at 4 or 8 bits (plus block constants), everything else in the load dtype
  adapter      LoRA parameters in fp32 (peft upcasts them) with their gradient and AdamW moments
  activations  per layer, the tensors autograd keeps (all of them, or the layer inputs with checkpointing)
  logits       batch x length x vocab in fp32 for the loss (twice: logits and their gradient)
  overhead     CUDA context and allocator slack

It is an estimate to catch recipes that cannot fit (a 7B model in bf16 on a 24 GB card), not a measurement.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Published config values (config.json on the Hub) of the architectures the GPU recipes name.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.1-8B-Instruct": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False},
    "Qwen/Qwen2.5-7B-Instruct": {
        "model_type": "qwen2", "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
        "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 152064, "tie_word_embeddings": False},
    "mistralai/Mistral-7B-Instruct-v0.3": {
        "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32768, "tie_word_embeddings": False},
}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
_OVERHEAD_GB = 1.5
GB = 1024**3


@dataclass(frozen=True)
class Shape:
    total_params: int
    linear_params: int  # in the decoder layers' linear modules (what 4/8-bit quantization stores compactly)
    lora_params: int
    hidden: int
    intermediate: int
    layers: int
    vocab: int
    kv_ratio: float  # key/value heads over attention heads (grouped-query attention)


@dataclass(frozen=True)
class Estimate:
    weights_gb: float
    adapter_gb: float
    activations_gb: float
    logits_gb: float
    overhead_gb: float
    shape: Shape

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.adapter_gb + self.activations_gb + self.logits_gb + self.overhead_gb


def architecture_config(name_or_path: str):
    """A transformers config for the model, from a local folder or the known families; None when unknown."""
    from pathlib import Path

    from transformers import AutoConfig

    if name_or_path in KNOWN_CONFIGS:
        values = dict(KNOWN_CONFIGS[name_or_path])
        return AutoConfig.for_model(values.pop("model_type"), **values)
    if name_or_path.startswith("builtin:"):  # built into the cache on first use; its config is there then
        from llmtune.builtin_models import cache_dir

        name_or_path = str(cache_dir() / "models" / name_or_path.removeprefix("builtin:"))
    if (Path(name_or_path) / "config.json").is_file():
        return AutoConfig.from_pretrained(name_or_path)
    return None


def model_shape(config, lora_r: int | None, target_modules: str | list[str] = "all-linear") -> Shape:
    """Parameter counts of the architecture, built on the meta device (no memory, no weights)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    total = sum(p.numel() for p in model.parameters())
    linear = lora = 0
    output = model.get_output_embeddings()
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is output:
            continue
        linear += module.weight.numel()
        targeted = target_modules == "all-linear" or name.rsplit(".", 1)[-1] in target_modules
        if lora_r and targeted:
            lora += lora_r * (module.in_features + module.out_features)
    heads = config.num_attention_heads
    return Shape(total, linear, lora, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                 config.vocab_size, getattr(config, "num_key_value_heads", heads) / heads)


def estimate(shape: Shape, *, dtype: str, load_in: str | None, batch_size: int, max_length: int,
             gradient_checkpointing: bool, optimizer: str = "adamw_torch", sequences_per_row: int = 1,
             shards: int = 1) -> Estimate:
    """Peak training memory per process. `sequences_per_row`: 2 for preference pairs (chosen and rejected);
    `shards`: processes that share weights and optimizer state (FSDP / ZeRO-3)."""
    dtype_bytes = _DTYPE_BYTES[dtype]
    if load_in is None:
        weights = shape.total_params * dtype_bytes
    else:
        bits = 4 if load_in == "4bit" else 8
        stored = shape.linear_params * bits / 8 * (1 + 0.5 / 64 * 8 / bits)  # fp32/8-bit absmax per 64 values
        weights = stored + (shape.total_params - shape.linear_params) * dtype_bytes
    moments = 2 if optimizer in ("adamw_8bit", "paged_adamw_8bit") else 8
    adapter = shape.lora_params * (4 + 4 + moments) if shape.lora_params else shape.total_params * (4 + 4 + moments)
    tokens = batch_size * max_length * sequences_per_row
    # Per layer and token, what a LLaMA-style block keeps for backward (bf16): attention inputs/outputs
    # (~6 hidden incl. q and grouped k, v) and the MLP's gate, up and product (3 intermediate) plus norms.
    per_layer_token = (8 * shape.hidden + 2 * shape.hidden * shape.kv_ratio + 3 * shape.intermediate) * 2
    if gradient_checkpointing:
        activations = tokens * (shape.hidden * 2 * shape.layers + per_layer_token)
    else:
        activations = tokens * per_layer_token * shape.layers
    logits = tokens * shape.vocab * 4 * 2
    return Estimate(weights / shards / GB, adapter / shards / GB, activations / GB, logits / GB, _OVERHEAD_GB, shape)
