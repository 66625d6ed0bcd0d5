"""Four per-step costs PEFT's LoRA layers add on a CPU, removed (measured on SmolLM2-135M, batch 8).

1. Input casts. Each LoRA layer casts its input to the adapter's dtype (fp32) before the adapter matmuls, and
   bf16 autocast casts it straight back for them: two copies of every input, in every layer, for nothing.
   While the loss is computed under autocast the cast is switched off (PEFT's `disable_input_dtype_casting`).
2. Dropout masks. `torch.nn.Dropout` on a CPU draws one Bernoulli sample per element from the Mersenne
   Twister (~5 ns each), and any dense mask costs full passes over every LoRA input, forward and backward.
   Here only the dropped positions are drawn (`dropped_positions`): the gaps between them are geometric, so
   there is one draw per dropped element (5% of them at p = 0.05) instead of one per element; the input is
   copied with those positions zeroed, and the scale 1/(1-p) is applied to the r-wide output. SmolLM2-135M,
   batch 8, dropout 0.05, same batches alternating in one process: forward + backward 10.5% faster than with
   a dense factor built from 16 random bits per element, and 8% slower than without dropout.
3. Dropout memory. `lora_A(dropout(x))` keeps, for the backward pass, the mask and the dropped input of every
   LoRA layer, although q, k and v (and gate and up) share one input: ~630 MB of a 3.5 GB peak. The fused
   `lora_A` below keeps the input (shared) and the dropped positions, drawn from a generator seeded from
   torch's (so `set_seed` still reproduces a run and resume restores it exactly).
4. The B product. `result + lora_B(h) * scaling` is three passes over the [tokens, out] output; `AddmmLoraLinear`
   accumulates it into the base output in place, the scale folded into the rank-16 weight.

Only vanilla LoRA layers on a CPU are changed (their dropout only up to SPARSE_MAX_P); GPUs keep torch's fused
dropout and PEFT's layers, DoRA and other variants PEFT's.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from peft.helpers import disable_input_dtype_casting
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer

# Above it, one draw and one scattered write per dropped element cost more than torch's dense dropout (one
# LoRA A layer, 8 x 96 x 576 input, forward + backward: 2.3 vs 6.2 ms at p = 0.5, 4.4 vs 6.5 at 0.7, 6.8 vs 6.0 at 0.9).
SPARSE_MAX_P = 0.75


def dropped_positions(count: int, p: float, seed: int) -> torch.Tensor:
    """The sorted flat positions, among `count`, that dropout with probability `p` zeroes, drawn from `seed`:
    each position independently with probability `p` (the same seed gives the same positions)."""
    generator = np.random.SFC64(seed)
    expected = count * p
    positions = _geometric_steps(generator, math.ceil(expected + 6 * math.sqrt(expected) + 16), p)
    while positions[-1] < count:  # the first draw covers `count` but with probability ~1e-9
        more = _geometric_steps(generator, math.ceil(expected / 2 + 16), p)
        positions = np.concatenate([positions, positions[-1] + 1 + more])
    return torch.from_numpy(positions[: np.searchsorted(positions, count)])


def _geometric_steps(generator: np.random.SFC64, draws: int, p: float) -> np.ndarray:
    """Cumulative sums of `draws` geometric gaps (trials up to and including a success), minus one: the
    positions of the successes in a run of Bernoulli(p) trials, by inversion, ceil(log U / log(1 - p)).
    U comes from 23 raw bits as a float in [1, 2) subtracted from 2, exactly: (0, 1] in steps of 2^-23 (numpy's
    own float draws cost ~3x more per value)."""
    bits = generator.random_raw(-(-draws // 2)).view(np.uint32)[:draws]
    bits >>= 9
    bits |= np.uint32(0x3F800000)  # float32 exponent of 1: the 23 bits become the mantissa
    uniform = bits.view(np.float32)
    np.subtract(2, uniform, out=uniform)
    np.log(uniform, out=uniform)
    uniform *= np.float32(1 / math.log1p(-p))
    gaps = np.ceil(uniform, out=uniform).astype(np.int64)
    np.maximum(gaps, 1, out=gaps)  # U = 1 is the edge of the first trial, not a gap of zero
    positions = np.cumsum(gaps, out=gaps)
    positions -= 1
    return positions


def _without(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A copy of `x` with the flat `positions` zeroed."""
    copy = x.clone(memory_format=torch.contiguous_format)
    copy.view(-1).index_fill_(0, positions, 0)
    return copy


class _DropoutLinear(torch.autograd.Function):
    """`F.linear(dropout(x), weight)`, keeping only `x` (shared with sibling layers) and the dropped positions
    (5% of the input's elements as int64 at p = 0.05: a fifth of a bf16 copy)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        positions = dropped_positions(x.numel(), p, seed)
        ctx.weight_dtype, weight = weight.dtype, weight.to(x.dtype)
        ctx.save_for_backward(x, weight, positions)
        ctx.scale = 1 / (1 - p)
        return F.linear(_without(x, positions), weight).mul_(ctx.scale)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, positions = ctx.saved_tensors
        grad_out = grad_out * ctx.scale
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight
            grad_x.view(-1).index_fill_(0, positions, 0)
        if ctx.needs_input_grad[1]:
            dropped = _without(x, positions).view(-1, x.shape[-1])
            grad_weight = (grad_out.reshape(-1, grad_out.shape[-1]).t() @ dropped).to(ctx.weight_dtype)
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
            if vanilla and on_cpu and isinstance(dropout, torch.nn.Dropout) and 0 < dropout.p <= SPARSE_MAX_P:
                lora_a.__class__ = DropoutLinear
                lora_a.dropout_p = dropout.p
                module.lora_dropout[name] = torch.nn.Identity()
                fused += 1
    return fused


class AddmmLoraLinear(LoraLinear):
    """A vanilla LoRA layer whose `B` product is accumulated into the base output in place by `addmm_`, the scale
    folded into the r-wide weight: PEFT's `result + lora_B(h) * scaling` makes three passes over the
    [tokens, out] output (B's product, the scaling, the sum) and one more backward (the scaling's). SmolLM2's
    gate projection, 768 tokens, forward + backward with its base matmul: 7.5 against 8.3 ms; whole SFT steps
    +3.7% (same batches alternating in one process)."""

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapters = [name for name in self.active_adapters if name in self.lora_A]
        if self.disable_adapters or self.merged or args or kwargs or len(adapters) != 1:
            return super().forward(x, *args, **kwargs)
        name = adapters[0]
        if name in self.lora_variant or self.lora_B[name].bias is not None:
            return super().forward(x, *args, **kwargs)
        lora_a = self.lora_A[name]
        h = lora_a(self.lora_dropout[name](self._cast_input_dtype(x, lora_a.weight.dtype)))
        base = self.get_base_layer()
        if type(base) is torch.nn.Linear:
            # a 2-D output of its own, so that the B product accumulates into it in place (no copy of it)
            result = F.linear(x.reshape(-1, x.shape[-1]), base.weight, base.bias)
        else:
            result = self.base_layer(x).flatten(0, -2).clone()
        scaled_b = (self.lora_B[name].weight * self.scaling[name]).to(result.dtype)
        result.addmm_(h.reshape(-1, h.shape[-1]).to(result.dtype), scaled_b.t())
        return result.view(*x.shape[:-1], result.shape[-1])


def fuse_lora_b(model: torch.nn.Module) -> int:
    """Let each CPU LoRA layer of PEFT's plain Linear class add its `B` product by addmm; returns how many."""
    fused = 0
    for module in model.modules():
        if type(module) is LoraLinear and module.get_base_layer().weight.device.type == "cpu":
            module.__class__ = AddmmLoraLinear
            fused += 1
    return fused


def streamline_lora_layers(model: torch.nn.Module) -> None:
    """Both fusions above; each leaves layers it changed already as they are."""
    fuse_dropouts(model)
    fuse_lora_b(model)


class StreamlinedAdapter:
    """Trainer mixin: fuses the LoRA dropouts and `B` products once TRL has wrapped the model with PEFT, and
    skips PEFT's input casts while the loss is computed under autocast (outside it, e.g. a forward on
    `trainer.model` after training, PEFT casts as usual)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        streamline_lora_layers(self.model)

    def _precompute_ref_logps(self, *args, **kwargs):
        # TRL's DPO scores the reference inside its own __init__: through the layers the policy will use, or the
        # loss at step zero is ln 2 only up to bf16 rounding
        streamline_lora_layers(self.model)
        return super()._precompute_ref_logps(*args, **kwargs)

    def compute_loss(self, model, inputs, *args, **kwargs):
        with disable_input_dtype_casting(model, active=self.args.bf16 or self.args.fp16):
            return super().compute_loss(model, inputs, *args, **kwargs)
