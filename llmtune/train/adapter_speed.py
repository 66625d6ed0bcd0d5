"""Three per-step costs PEFT's LoRA layers add on a CPU, removed (measured on SmolLM2-135M, batch 8).

1. Input casts. Each LoRA layer casts its input to the adapter's dtype (fp32) before the adapter matmuls, and
   bf16 autocast casts it straight back for them: two copies of every input, in every layer, for nothing.
   While the loss is computed under autocast the cast is switched off (PEFT's `disable_input_dtype_casting`).
2. Dropout masks. `torch.nn.Dropout` on a CPU draws one Bernoulli sample per element from the Mersenne
   Twister (~5 ns each): with LoRA dropout on all linear layers, 20% of a training step. Here 64 random bits
   are drawn per 4 elements, and an element is kept when its 15 bits fall below round(keep x 2^15): Bernoulli
   with the keep probability rounded to 2^-15, scaled by the inverse of that probability, so the expectation
   is unchanged.
3. Dropout memory. `lora_A(dropout(x))` keeps, for the backward pass, the mask and the dropped input of every
   LoRA layer, although q, k and v (and gate and up) share one input: ~630 MB of a 3.5 GB peak. The fused
   `lora_A` below keeps the input (shared) and a seed, and redraws the mask in the backward pass from a
   generator seeded from torch's (so `set_seed` still reproduces a run and resume restores it exactly).

Only vanilla LoRA layers on a CPU are changed; GPUs keep torch's fused dropout, DoRA and other variants PEFT's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.helpers import disable_input_dtype_casting
from peft.tuners.tuners_utils import BaseTunerLayer

_LANE_BITS = 15  # torch's int64 random_() draws from [0, 2^63): the top 16-bit lane has one bit fewer


def dropout_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> tuple[torch.Tensor, float]:
    """Keep mask for dropout probability `p` from `seed`, and the scale that keeps the expectation."""
    threshold = round((1 - p) * 2**_LANE_BITS)
    count = shape.numel()
    generator = torch.Generator(device=device).manual_seed(seed)
    bits = torch.empty((count + 3) // 4, dtype=torch.int64, device=device).random_(generator=generator)
    keep = (bits.view(torch.int16)[:count].view(shape) & (2**_LANE_BITS - 1)) < threshold
    return keep, 2**_LANE_BITS / threshold


def _dropout_factor(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """The mask times the scale, in `x`'s dtype: what dropout multiplies `x` by (same seed, same factor)."""
    keep, scale = dropout_mask(x.shape, p, seed, x.device)
    return keep.to(x.dtype) * scale


class _DropoutLinear(torch.autograd.Function):
    """`F.linear(dropout(x), weight)`, keeping only `x` (shared with sibling layers) and the mask's seed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.p, ctx.seed = p, seed
        return F.linear(x * _dropout_factor(x, p, seed), weight.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight = ctx.saved_tensors
        factor = _dropout_factor(x, ctx.p, ctx.seed)
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ weight.to(grad_out.dtype)) * factor
        if ctx.needs_input_grad[1]:
            dropped = (x * factor).reshape(-1, x.shape[-1])
            grad_weight = (grad_out.reshape(-1, grad_out.shape[-1]).t() @ dropped.to(grad_out.dtype)).to(weight.dtype)
        return grad_x, grad_weight, None, None


class DropoutLinear(torch.nn.Linear):
    """A LoRA `A` matrix that applies its layer's dropout itself (see the module docstring)."""

    dropout_p: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropout_p == 0:
            return super().forward(x)
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        seed = int(torch.randint(0, 2**62, (), device="cpu"))  # from torch's generator: runs reproduce
        return _DropoutLinear.apply(x, self.weight, self.dropout_p, seed)


def fuse_dropouts(model: torch.nn.Module) -> int:
    """Fuse each vanilla CPU LoRA layer's dropout into its `A` matrix; returns how many were fused."""
    fused = 0
    for module in model.modules():
        if not isinstance(module, BaseTunerLayer) or not hasattr(module, "lora_dropout"):
            continue
        for name, dropout in list(module.lora_dropout.items()):
            lora_a = module.lora_A[name]
            vanilla = name not in getattr(module, "lora_variant", {}) and type(lora_a) is torch.nn.Linear
            on_cpu = lora_a.weight.device.type == "cpu"
            if vanilla and on_cpu and isinstance(dropout, torch.nn.Dropout) and dropout.p > 0:
                lora_a.__class__ = DropoutLinear
                lora_a.dropout_p = dropout.p
                module.lora_dropout[name] = torch.nn.Identity()
                fused += 1
    return fused


class StreamlinedAdapter:
    """Trainer mixin: fuses the LoRA dropouts once TRL has wrapped the model with PEFT, and skips PEFT's input
    casts while the loss is computed under autocast (outside it, e.g. a forward on `trainer.model` after
    training, PEFT casts as usual)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        fuse_dropouts(self.model)

    def compute_loss(self, model, inputs, *args, **kwargs):
        with disable_input_dtype_casting(model, active=self.args.bf16 or self.args.fp16):
            return super().compute_loss(model, inputs, *args, **kwargs)
