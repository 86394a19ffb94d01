"""The reference model of DPO and GRPO: the policy as it was before training, without a second copy
where that is possible.

With LoRA or QLoRA whose trainable parameters all live in the adapters, the reference is the same model
with its adapters switched off: the frozen base is exactly the starting point, and costs no memory. Full
fine-tuning changes the base itself, and LoRA's `modules_to_save` trains the embeddings or the LM head in
place, so those keep a frozen copy made before the first update.
"""

import contextlib
import copy

import torch

from ..lora import LoRALinear, set_adapters_enabled


class ReferenceModel:
    def __init__(self, model):
        """Call before the first optimizer step, after the adapters are in place."""
        adapter_params = {id(p) for m in model.modules() if isinstance(m, LoRALinear) for p in m.parameters()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.by_disabling_adapters = bool(trainable) and all(id(p) in adapter_params for p in trainable)
        self.model = model
        self.frozen_copy = None
        if not self.by_disabling_adapters:
            self.frozen_copy = copy.deepcopy(model).eval().requires_grad_(False)

    def describe(self) -> str:
        if self.by_disabling_adapters:
            return "reference model: the same model with its adapters switched off (no second copy)"
        return "reference model: a frozen copy of the starting weights (full fine-tuning or modules_to_save)"

    @contextlib.contextmanager
    def active(self):
        """Yields the module to run for reference log-probabilities, under torch.no_grad."""
        with torch.no_grad():
            if self.frozen_copy is not None:
                yield self.frozen_copy
                return
            set_adapters_enabled(self.model, False)
            try:
                yield self.model
            finally:
                set_adapters_enabled(self.model, True)
