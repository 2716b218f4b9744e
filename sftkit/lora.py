"""peft's LoRA linear layer with a leaner forward: the adapter's update is added into the base
layer's output in place, by one addmm.

peft computes `result + lora_B(lora_A(x)) * scaling`: three more tensors of the layer's output
size per layer (the B product, its scaled copy, the sum), each written and read again in the
forward pass and once more in the backward pass. Here the B product goes straight into the base
output (`addmm_` with `alpha=scaling`), which autograd differentiates exactly the same way. The
layer is peft's own class otherwise (same parameters, names, saving, merging); any case the fast
path does not cover (DoRA and other variants, several active adapters, merged or disabled
adapters, extra arguments) takes peft's forward unchanged.

With a bf16/fp16 base model (on GPUs) peft keeps the adapters in fp32; the update is then computed
in the activations' dtype from casts of the adapter weights -- mixed precision as autocast does it --
while the optimizer still updates the fp32 weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from peft.tuners.tuners_utils import BaseTunerLayer

from .compat import register_lora_layer


class FusedLoraLinear(PeftLoraLinear):
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        active = self.active_adapters
        if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1
                or active[0] not in self.lora_A or active[0] in self.lora_variant):
            return super().forward(x, *args, **kwargs)
        name = active[0]
        base = self.get_base_layer()
        a, b = self.lora_A[name].weight, self.lora_B[name].weight
        if x.dtype != base.weight.dtype or not (a.dtype == b.dtype == x.dtype or a.dtype == b.dtype == torch.float32):
            return super().forward(x, *args, **kwargs)
        # A bf16/fp16 base keeps fp32 adapters (peft's default): compute the update in the activations'
        # dtype from casts of them, as autocast would, so their gradients still land in fp32. (peft
        # instead casts every layer's input up to fp32 and keeps that copy for backward.)
        a, b = a.to(x.dtype), b.to(x.dtype)
        x2 = x.reshape(-1, x.shape[-1])
        out = F.linear(x2, base.weight, base.bias)
        # F.linear keeps its input and weight for backward, not its output: updating it in place is safe.
        out.addmm_(F.linear(self.lora_dropout[name](x2), a), b.t(), alpha=self.scaling[name])
        return out.view(*x.shape[:-1], out.shape[-1])


def use_fused_lora(lora_config) -> None:
    """Have peft build FusedLoraLinear for the plain `nn.Linear` layers it adapts (4-bit and other
    quantized layers keep their own classes)."""
    register_lora_layer(lora_config, torch.nn.Linear, _dispatch)


def _dispatch(target, adapter_name, config, **kwargs):
    # peft calls this for subclasses of nn.Linear too (bitsandbytes' 4-bit layers are some): only
    # an exact nn.Linear gets the fused layer; returning None hands the rest to peft's dispatch.

    base = target.get_base_layer() if isinstance(target, BaseTunerLayer) else target
    if type(base) is not torch.nn.Linear or config.fan_in_fan_out:
        return None
    return FusedLoraLinear(target, adapter_name, config=config, **kwargs)
