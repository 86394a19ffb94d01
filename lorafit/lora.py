"""LoRA adapters by composition: `LoRALinear` wraps a base linear layer (dense or NF4) and adds B·A.

    y = base(x) + scaling · B(A(dropout(x)))      scaling = alpha / r,  or alpha / sqrt(r) with rsLoRA

DoRA (weight-decomposed LoRA) rescales each output row to a learned magnitude m:
    y = bias + m / ||W + scaling·B·A||_row · (W x + scaling · B A x)
with the row norm treated as a constant in backward (DoRA paper §4.3), exactly as PEFT computes it.

Module and parameter names follow PEFT (`q_proj.base_layer`, `q_proj.lora_A.weight`, `q_proj.lora_B.weight`,
`q_proj.lora_magnitude_vector`), so adapters save in PEFT's on-disk format without renaming (adapter_io.py).
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .kernels.lora_linear import compute_adapters, lora_linear, split_gate_up, swiglu_lora_linear
from .kernels.swiglu import swiglu
from .nn.linear import Linear, can_prepack

TARGET_GROUPS = {
    "all-linear": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "attention": ("q_proj", "k_proj", "v_proj", "o_proj"),
    "mlp": ("gate_proj", "up_proj", "down_proj"),
}
# Layers that `modules_to_save` may make fully trainable (the rest of the model stays frozen).
SAVABLE_MODULES = ("embed_tokens", "lm_head")


@dataclass(frozen=True)
class LoRAConfig:
    """What `apply_lora` did: kept on the model (as `model.lora_config`) so that saving needs no arguments."""

    r: int = 16
    alpha: float = 16
    dropout: float = 0.0
    rslora: bool = False
    dora: bool = False
    target_modules: tuple[str, ...] = ()  # full module names, e.g. "model.layers.0.self_attn.q_proj"
    modules_to_save: tuple[str, ...] = field(default=())

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r


class LoRALinear(nn.Module):
    def __init__(self, base_layer: nn.Module, config: LoRAConfig):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        device, dtype = _weight_device_dtype(base_layer)
        # PEFT's default init: A as nn.Linear initialises (Kaiming-uniform, a=sqrt(5)), B zeros, so that the
        # adapter starts as an exact no-op.
        self.lora_A = nn.Linear(self.in_features, config.r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(config.r, self.out_features, bias=False, device=device, dtype=dtype)
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.scaling = config.scaling
        self.lora_magnitude_vector = None
        if config.dora:
            with torch.no_grad():  # B = 0, so the magnitude starts at the base weight's row norms
                norms = torch.linalg.norm(base_weight(base_layer).float(), dim=1)
            self.lora_magnitude_vector = nn.Parameter(norms.to(dtype))
        self.disabled = False  # True: behave exactly as the base layer (the DPO reference model)
        self.decode_rows = 0  # > 0 inside nn.linear.prepacked_weights: the base holds a packed merged weight
        self._adapters_seen, self._compute_adapters = None, None
        # False where something other than in-place updates changes the adapters' values without a new
        # version: FSDP2 gathers the shards into the same unsharded tensors before every forward.
        self.keep_compute_adapters = True
        # True in a decoder layer that is checkpointed (CausalLM.activation_checkpointing): memory is what it
        # was checkpointed for, so its adapters' compute-dtype copies are made at each call and not kept.
        self.in_checkpointed_layer = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disabled:
            return self.base_layer(x)
        if self.decode_rows and x.numel() == self.decode_rows * self.in_features:
            return self.base_layer(x)  # the packed W + s·BA; other row counts take the path below, on W
        if (self.training or torch.is_grad_enabled()) and self._fused_path_applies(x):
            # Training: one autograd function that keeps no copies of x (kernels/lora_linear.py). Also without
            # grad in training mode: an offloaded layer's first forward then rounds as its recomputation does
            # (bit-identical activations), and skips the composed path's float32 cast of x (on an H200 with
            # Llama-3.2-1B offloaded, 144 casts of (2, 2048, 2048) a micro-batch took 7 ms).
            return lora_linear(x, self._frozen_weight(), self.base_layer.bias, self.lora_A.weight,
                               self.lora_B.weight, self.scaling, self.compute_adapters(x.dtype))
        y = self.base_layer(x)
        # Adapters train in float32 over a bf16 base: outside autocast the input meets them in their dtype
        # and the update returns in the base's. (Under autocast both are already the autocast dtype.)
        dropped = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        a = self.lora_A(dropped)  # (..., r)
        if self.lora_magnitude_vector is None:
            if a.dtype == y.dtype:
                # y + scaling·B(a) as one addmm, with the scaling on B's (out, r) weight rather than on the
                # (tokens, out) product: one kernel instead of three, ~30x fewer multiplications at r = 16.
                scaled_b = (self.lora_B.weight * self.scaling).t().to(a.dtype)  # (r, out)
                return torch.addmm(y.reshape(-1, y.shape[-1]), a.reshape(-1, a.shape[-1]), scaled_b).view(y.shape)
            return y + (self.lora_B(a) * self.scaling).to(y.dtype)
        update = (self.lora_B(a) * self.scaling).to(y.dtype)  # (..., out)
        weight = base_weight(self.base_layer).to(y.dtype)
        row_scale = (self.lora_magnitude_vector / self.row_norm(weight)).to(y.dtype)  # (out,)
        # Without dropout x == dropped and the base output is reused: W x = y - bias.
        if isinstance(self.lora_dropout, nn.Identity):
            base_out = y if self.base_layer.bias is None else y - self.base_layer.bias
        else:
            base_out = F.linear(dropped.to(y.dtype), weight)
        return y + (row_scale - 1) * base_out + row_scale * update

    def forward_swiglu(self, gate: torch.Tensor, up: torch.Tensor | None) -> torch.Tensor:
        """self(silu(gate) * up); in training the product is recomputed in backward instead of being kept.
        up None: gate is [gate | up] packed along its last dimension (a stacked projection's output)."""
        if (self.training or torch.is_grad_enabled()) and not self.disabled and self._fused_path_applies(gate):
            return swiglu_lora_linear(gate, up, self._frozen_weight(), self.base_layer.bias, self.lora_A.weight,
                                      self.lora_B.weight, self.scaling, self.compute_adapters(gate.dtype))
        return self(swiglu(*split_gate_up(gate, up)))

    @property
    def keeps_adapter_copies(self) -> bool:
        """Whether copies made from the adapters (compute_adapters, a 4-bit base's stacked adapter blocks) are
        kept between calls. Kept, they cost 3.9 MB a decoder layer of Llama-3.1-8B QLoRA (126 MB in all,
        which put its memory mode 0.07 GiB over Unsloth's 7.07, device call 50); made at every call, a few
        dozen small kernels a layer and micro-batch."""
        return self.keep_compute_adapters and not self.in_checkpointed_layer

    def compute_adapters(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, scaling * B) in `dtype`, made again only when the adapters changed (an optimizer step or a load
        bumps their version) rather than cast on every call, where copies are kept (keeps_adapter_copies)."""
        seen = (dtype, self.scaling) + tuple((p.data_ptr(), p._version) for p in (self.lora_A.weight,
                                                                                  self.lora_B.weight))
        if seen == self._adapters_seen and self.keeps_adapter_copies:
            return self._compute_adapters
        adapters = compute_adapters(self.lora_A.weight, self.lora_B.weight, self.scaling, dtype)
        kept = self.keeps_adapter_copies
        self._compute_adapters, self._adapters_seen = (adapters, seen) if kept else (None, None)
        return adapters

    def _fused_path_applies(self, x: torch.Tensor) -> bool:
        device = x.device.type
        if torch.is_autocast_enabled(device) and torch.get_autocast_dtype(device) != x.dtype:
            # A float32 model under bf16 autocast: the function's products would come out in bf16 and its
            # in-place adds meet float32 adapters. The composed path, whose every op autocast casts, takes it.
            return False
        base = self.base_layer
        if isinstance(base, nn.Linear):
            frozen_in_x_dtype = not base.weight.requires_grad and x.dtype == base.weight.dtype
        else:  # NF4: frozen by construction
            frozen_in_x_dtype = is_quantized_linear(base) and x.dtype == base.compute_dtype
        return frozen_in_x_dtype and isinstance(self.lora_dropout, nn.Identity) and self.lora_magnitude_vector is None

    def _frozen_weight(self):
        """What lora_linear multiplies by: a dense base's weight, or the NF4 layer, dequantised there on demand."""
        return self.base_layer.weight if isinstance(self.base_layer, nn.Linear) else self.base_layer

    def can_pack_merged(self) -> bool:
        """Whether CPU decoding can run this layer as one packed W + s·BA (nn/linear.py): a float32 base,
        adapters on, and no dropout in effect."""
        return (isinstance(self.base_layer, Linear) and can_prepack(self.base_layer.weight) and not self.disabled
                and self.lora_A.weight.dtype == self.base_layer.weight.dtype
                and (not self.training or isinstance(self.lora_dropout, nn.Identity)))

    def pack_merged(self, rows: int, backend: str = "mkl") -> None:
        """Packs W + s·BA into the base layer for `rows`-row inputs; repacked when any of the weights changed."""
        params = [p for p in (self.lora_A.weight, self.lora_B.weight, self.lora_magnitude_vector) if p is not None]
        key = tuple((p.data_ptr(), p._version) for p in params)
        self.base_layer.pack(rows, backend, self.merged_weight, key)
        self.decode_rows = rows

    def row_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """||W + scaling·B·A|| per output row, detached (DoRA §4.3)."""
        delta = self.lora_B.weight @ self.lora_A.weight  # (out, in)
        return torch.linalg.norm(weight + self.scaling * delta.detach().to(weight.dtype), dim=1).detach()

    def merged_weight(self, original: torch.Tensor | None = None) -> torch.Tensor:
        """The dense weight that makes base_layer alone compute what this layer computes (no dropout).
        `original`: the base weight to merge into instead of the layer's own (the 16-bit one of a QLoRA base)."""
        weight = base_weight(self.base_layer)
        if original is not None:
            if original.shape != weight.shape:
                raise ValueError(f"original weight has shape {tuple(original.shape)}, the layer {tuple(weight.shape)}")
            weight = original.to(device=weight.device, dtype=weight.dtype)
        merged = weight + self.scaling * (self.lora_B.weight @ self.lora_A.weight).to(weight.dtype)
        if self.lora_magnitude_vector is not None:
            merged = merged * (self.lora_magnitude_vector / self.row_norm(weight)).to(weight.dtype)[:, None]
        return merged

    def extra_repr(self) -> str:
        kind = "DoRA" if self.lora_magnitude_vector is not None else "LoRA"
        return f"{kind} r={self.lora_A.out_features}, scaling={self.scaling:g}"


def base_weight(layer: nn.Module) -> torch.Tensor:
    """The dense (out, in) weight of a base layer: nn.Linear's own, or an NF4 layer's dequantised one."""
    if isinstance(layer, nn.Linear):
        return layer.weight
    return layer.dequantized_weight()


def _weight_device_dtype(layer: nn.Module) -> tuple[torch.device, torch.dtype]:
    if isinstance(layer, nn.Linear):
        return layer.weight.device, layer.weight.dtype
    # Quantised layers store packed codes; adapters live in the layer's compute dtype.
    return next(layer.buffers()).device, layer.compute_dtype


def is_quantized_linear(m: nn.Module) -> bool:
    """A quantised linear layer (NF4): anything that is not nn.Linear but can hand out its dense weight."""
    return not isinstance(m, nn.Linear) and callable(getattr(m, "dequantized_weight", None))


def is_base_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or is_quantized_linear(m)


def linear_layer_names(model: nn.Module) -> dict[str, nn.Module]:
    """Every adaptable linear layer (dense or NF4; never the output head nor an adapter's own A/B)."""
    return {
        name: m
        for name, m in model.named_modules()
        if is_base_linear(m) and name != "lm_head" and not name.endswith((".lora_A", ".lora_B"))
    }


def resolve_targets(model: nn.Module, targets) -> list[str]:
    """"all-linear" / "attention" / "mlp", or a list of short names ("q_proj") or full module names."""
    layers = linear_layer_names(model)
    if isinstance(targets, str):
        if targets not in TARGET_GROUPS:
            raise ValueError(
                f"targets {targets!r} is not a group (groups: {', '.join(TARGET_GROUPS)}; or give a list of names)"
            )
        targets = TARGET_GROUPS[targets]
    targets = list(targets)
    short_names = sorted({name.rsplit(".", 1)[-1] for name in layers})
    chosen = []
    for target in targets:
        matches = [n for n in layers if n == target or n.rsplit(".", 1)[-1] == target]
        if not matches:
            raise ValueError(f"target {target!r} matches no linear layer (the model has: {', '.join(short_names)})")
        chosen += matches
    return sorted(set(chosen), key=list(layers).index)


def apply_lora(
    model: nn.Module,
    r: int = 16,
    alpha: float | None = None,
    dropout: float = 0.0,
    targets="all-linear",
    rslora: bool = False,
    dora: bool = False,
    modules_to_save=(),
    verbose: bool = True,
) -> nn.Module:
    """Wraps the target layers in `LoRALinear` and freezes everything else. alpha None means alpha = r."""
    if not isinstance(r, int) or r <= 0:
        raise ValueError(f"r must be a positive integer, got {r!r} (the guide recommends 16 or 32)")
    alpha = r if alpha is None else alpha
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r} (the guide: alpha = r or 2r)")
    if not 0 <= dropout < 1:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r} (the guide: 0, at most 0.1)")
    if getattr(model, "lora_config", None) is not None:
        raise ValueError("the model already has LoRA adapters; merge_lora first, or load a fresh model")
    for name in modules_to_save:
        if name not in SAVABLE_MODULES:
            raise ValueError(f"modules_to_save: {name!r} is not supported (supported: {', '.join(SAVABLE_MODULES)})")

    names = resolve_targets(model, targets)
    config = LoRAConfig(r, alpha, dropout, rslora, dora, tuple(names), tuple(modules_to_save))
    for p in model.parameters():
        p.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), config))
    for name in modules_to_save:
        module = model.model.embed_tokens if name == "embed_tokens" else model.lm_head
        module.weight.requires_grad_(True)
    model.lora_config = config
    if hasattr(model, "activation_checkpointing"):  # the new layers learn which decoder layers are checkpointed
        model.activation_checkpointing = model.activation_checkpointing
    if verbose:
        print(parameter_summary(model))
    return model


def remove_lora(model: nn.Module, requires_grad: dict[str, bool] | None = None) -> nn.Module:
    """Unwraps every LoRALinear back to its base layer, dropping the adapters (the opposite of apply_lora).
    requires_grad: the per-parameter flags to restore (apply_lora froze everything)."""
    for name, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, m.base_layer)
    for name, p in model.named_parameters():
        if requires_grad is not None and name in requires_grad:
            p.requires_grad_(requires_grad[name])
    model.lora_config = None
    return model


def set_adapters_enabled(model: nn.Module, enabled: bool) -> None:
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.disabled = not enabled


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total); a tied embedding counts once, as PEFT counts it. A quantised layer's weight counts
    by its shape: the packed codes and scales that it stores as frozen parameters are not weights."""
    quantized = [m for m in model.modules() if is_quantized_linear(m)]
    stored = {id(p) for m in quantized for p in m.parameters() if p is not m.bias}
    trainable = total = 0
    for p in model.parameters():
        if id(p) in stored:
            continue
        n = p.numel()
        total += n
        trainable += n if p.requires_grad else 0
    total += sum(m.in_features * m.out_features for m in quantized)
    return trainable, total


def parameter_summary(model: nn.Module) -> str:
    trainable, total = count_parameters(model)
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.4f}%)"


@torch.no_grad()
def merge_lora(model: nn.Module, base_weights=None) -> nn.Module:
    """Folds every adapter into its base layer and removes the wrappers.

    A QLoRA (NF4) base becomes a dense layer in its compute dtype. Merging into the dequantised 4-bit weight
    keeps the 4-bit rounding error in the merged model; `base_weights`, a mapping from weight name
    ("model.layers.0.self_attn.q_proj.weight") to the original 16/32-bit tensor (`read_base_weights` reads
    them from the checkpoint), merges into the originals instead.
    """
    for name, m in list(model.named_modules()):
        if not isinstance(m, LoRALinear):
            continue
        original = None if base_weights is None else base_weights.get(f"{name}.weight")
        weight = m.merged_weight(original)
        merged = Linear(m.in_features, m.out_features, bias=m.base_layer.bias is not None, device="meta")
        merged.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        if m.base_layer.bias is not None:
            merged.bias = nn.Parameter(m.base_layer.bias.detach().clone(), requires_grad=False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, merged)
    model.lora_config = None
    return model
