"""The Llama decoder (Llama 2 / 3.x, Mistral, SmolLM2), and the base of the Qwen families.

Parameter names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`, ...), so checkpoints load
name for name. Qwen2 adds a bias to q, k, v; Qwen3 normalises q and k per head: both are flags of
`ModelConfig`, and qwen2.py / qwen3.py only translate their config.json.

Shapes: B batch, T new tokens, S keys (cached + new), H query heads, Hkv key/value heads, D head_dim,
C hidden size, V vocabulary.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import eager_cuda
from ..kernels.cross_entropy import linear_cross_entropy
from ..kernels.lora_mlp import FusedMLPWeights, can_fuse, lora_mlp
from ..kernels.lora_stacked import StackedWeights, can_stack, lora_stacked, spare_columns
from ..kernels.rms_norm import add_rms_norm
from ..kernels.rope import rope
from ..kernels.swiglu import swiglu
from ..nn.attention import attention, can_run_varlen, varlen_attention
from ..nn.checkpointing import OffloadChain, PinnedBuffers, run_layer, takes_delta
from ..nn.linear import Linear
from ..nn.norm import RMSNorm
from ..nn.rope import RotaryEmbedding, apply_rope
from ..nn.tiled_mlp import tiled_mlp
from .config import ModelConfig, base_config_from_hf


def config_from_hf(hf: dict) -> ModelConfig:
    """Llama and Mistral (Mistral is Llama with an optional sliding attention window)."""
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        raise ValueError("Llama configs with attention_bias or mlp_bias are not supported")
    window = hf.get("sliding_window")
    if window is not None and window >= hf.get("max_position_embeddings", 0):
        window = None  # a window as long as the context changes nothing
    return base_config_from_hf(hf, sliding_window=window)


class Attention(nn.Module):
    fused = True  # the Triton RoPE kernel on CUDA (CausalLM.kernels switches it)
    fused_lora = True  # LoRA training on CUDA: q, k and v as one function over one weight (kernels/lora_stacked.py)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        C, q_dim, kv_dim = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.q_proj = Linear(C, q_dim, bias=config.attention_bias)
        self.k_proj = Linear(C, kv_dim, bias=config.attention_bias)
        self.v_proj = Linear(C, kv_dim, bias=config.attention_bias)
        self.o_proj = Linear(q_dim, C, bias=False)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.qkv_weights: StackedWeights | None = None  # made on the first stacked LoRA training pass

    def _stacks(self, x) -> bool:
        """Whether q, k and v run as one function over one matrix (kernels/lora_stacked.py): LoRA training on
        CUDA, in training mode with or without grad, as the MLP (an offloaded layer's two forwards round alike)."""
        return self.fused_lora and x.is_cuda and self.training and can_stack((self.q_proj, self.k_proj, self.v_proj), x)

    def spare_input_columns(self, x) -> int:
        """Columns the stacked q, k, v fill beside their input (x A^T): what input_layernorm may leave."""
        return spare_columns((self.q_proj, self.k_proj, self.v_proj)) if self._stacks(x) else 0

    def project(self, x, cos=None, sin=None):
        """x (B, T, C), or (B, T, C + spare_input_columns) from the norm -> q (B, T, H, D), k and v
        (B, T, Hkv, D), q and k normalised where the family does; and given the tables cos and sin
        (B, 1, T, D), rotated where the RoPE kernel runs (`rotates`): in the stacked function when it runs."""
        B, T, width = x.shape
        layers = (self.q_proj, self.k_proj, self.v_proj)
        rotate = cos is not None and self.rotates(x)
        # With spare columns the decoder layer has found already that the stacked function runs: asking again
        # costs ~20 us of host time a layer, which a small model's eager step waits on.
        if width != self.q_proj.in_features or self._stacks(x):
            if self.qkv_weights is None or not self.qkv_weights.holds(layers):
                self.qkv_weights = StackedWeights(layers)
            if rotate and self.q_norm is None:  # q and k rotated in place in the function's one output
                rotary = (cos[:, 0].to(x.dtype), sin[:, 0].to(x.dtype))
                return lora_stacked(x, self.qkv_weights, layers, separate=True, rotary=rotary)
            # Views into one (B, T, q_dim + 2 kv_dim) output: rope reads q and k in place.
            q, k, v = lora_stacked(x, self.qkv_weights, layers, separate=True)
            # Attention keeps v for backward, and a view would keep all of qkv: 10 KB a token and layer more
            # for Llama-3.1-8B (1.3 GiB at 2 x 2048 tokens over 32 layers), for an 8 MB copy.
            v = v.contiguous()
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(B, T, self.num_heads, self.head_dim)
        k = k.view(B, T, self.num_kv_heads, self.head_dim)
        v = v.view(B, T, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rotate:  # one kernel rotates q and k in the projections' layout
            q, k = rope(q, k, cos[:, 0].to(q.dtype), sin[:, 0].to(q.dtype))
        return q, k, v

    def rotates(self, x) -> bool:
        """Whether project rotates q and k (the Triton RoPE kernel, on CUDA); if not, forward applies the reference."""
        return self.fused and x.is_cuda

    def forward(self, x, cos, sin, mask=None, cache=None, layer_idx=0):
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        # Transposed views of (B, T, H, D): SDPA then writes its output in that layout too, and the reshape
        # for o_proj below is a view, not a copy (measured on an H200 with cuDNN attention).
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H|Hkv, T, D)
        if not self.rotates(x):
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(mask, PackedDocuments):  # packed documents on a GPU: flash attention's varlen kernel
            flat = lambda t: t.transpose(1, 2).reshape(B * T, t.shape[1], self.head_dim)  # noqa: E731
            y = varlen_attention(flat(q), flat(k), flat(v), mask.cu_seqlens, mask.max_seqlen)  # (B * T, H, D)
            return self.o_proj(y.view(B, T, -1))
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)  # (B, Hkv, S, D): the cached keys followed by the new ones
        y = attention(q, k, v, mask=mask)  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    fused = True  # the Triton SwiGLU kernel on CUDA: keeps gate and up for backward, not silu(gate) too
    # LoRA training on CUDA: the three projections as one function (kernels/lora_mlp.py), or where it does not
    # apply (down unlike gate and up), gate and up as one (kernels/lora_stacked.py)
    fused_lora = True
    # From this many tokens in a pass (B * T) the MLP runs tile_chunk_tokens of them at a time (nn/tiled_mlp.py):
    # gate and up (57 KB a token at Llama-3.1-8B in bf16), their grads and silu(gate) * up then exist for one
    # chunk, and a layer keeps only the MLP's input. The price is one more MLP forward per pass. Measured on an
    # H200 (two 8B layers, LoRA r=16, one sequence, both offloaded): at 32K tokens 1.15x the time for a peak of
    # 4.1 GiB instead of 7.0; at 64K 1.09x, 8.1 GiB instead of 14.1; at 128K 1.05x, 16.1 instead of 28.1. Rows
    # of 2K tokens pay more (cheap attention: 26-38% by FLOPs), hence from 64K: the 16 x 2048 = 32,768 tokens
    # `batch_size: auto` picks for a small model on an H200, where memory is not short, stay untiled. Chunks of
    # 8,192 tokens: 1.4 GB of transients at 8B (6 x I values a token; 5.6 measured), GEMMs of twice the anchor
    # workload's 4,096 rows, and a 4-bit base dequantising the MLP's three weights per chunk (0.33 ms) adds 9% to
    # the chunk's 3.7 ms forward (the tiled QLoRA MLP measured 6% slower than LoRA's). None: never tile.
    tile_tokens: int | None = 65_536
    tile_chunk_tokens = 8_192

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.fused_weights: FusedMLPWeights | None = None  # made on the first fused LoRA training pass
        self.gate_up_stack: StackedWeights | None = None  # likewise, for a 4-bit base

    def tiles(self, tokens: int) -> bool:
        """Whether a pass over this many tokens (B * T) runs tiled (lorafit/memory.py counts by this too)."""
        return self.tile_tokens is not None and tokens >= self.tile_tokens

    def forward(self, x):
        if self.tiles(x.numel() // x.shape[-1]):
            params = [p for p in self.parameters() if p.requires_grad]
            return tiled_mlp(self._forward_untiled, x, params, self.tile_chunk_tokens)
        return self._forward_untiled(x)

    def _fuses(self, x) -> bool:
        """Whether gate, up and down run as one function (kernels/lora_mlp.py): LoRA training on CUDA, in
        training mode with or without grad (an offloaded layer's forward without grad and its recomputation
        with grad then round alike, and give bit-identical activations)."""
        return (self.fused_lora and x.is_cuda and self.training
                and can_fuse(self.gate_proj, self.up_proj, self.down_proj, x))

    def spare_input_columns(self, x) -> int:
        """Columns the fused LoRA MLP fills beside its input (x A^T, untiled): what the norm before may leave."""
        untiled = not self.tiles(x.numel() // x.shape[-1])
        return spare_columns((self.gate_proj, self.up_proj)) if untiled and self._fuses(x) else 0

    def _forward_untiled(self, x):
        """x (..., C), or (..., C + spare_input_columns) from the norm -> (..., C), all rows at once."""
        layers = (self.gate_proj, self.up_proj, self.down_proj)
        if x.shape[-1] != self.gate_proj.in_features or self._fuses(x):  # spare columns: as in Attention.project
            if self.fused_weights is None or not self.fused_weights.holds(*layers):
                self.fused_weights = FusedMLPWeights(*layers)
            return lora_mlp(x, self.fused_weights, *layers)
        if self.fused and x.is_cuda:
            swiglu_lora = hasattr(self.down_proj, "forward_swiglu")  # a LoRA layer: recomputes its input in backward
            layers = (self.gate_proj, self.up_proj)
            if self.fused_lora and self.training and swiglu_lora and can_stack(layers, x):
                # Gate and up as one stacked projection, its [gate | up] output packed into down's SwiGLU
                # (kernels/lora_stacked.py).
                if self.gate_up_stack is None or not self.gate_up_stack.holds(layers):
                    self.gate_up_stack = StackedWeights(layers)
                return self.down_proj.forward_swiglu(lora_stacked(x, self.gate_up_stack, layers), None)
            gate, up = self.gate_proj(x), self.up_proj(x)  # (B, T, I) each
            if swiglu_lora:
                return self.down_proj.forward_swiglu(gate, up)
            return self.down_proj(swiglu(gate, up))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask=None, cache=None, layer_idx=0, delta=None, defer=False):
        """x (B, T, C) -> the residual stream after this layer. delta: the previous layer's MLP output, not yet
        added to x: the add runs here, inside input_layernorm's kernel where it runs. defer: return (x, the MLP's
        output) unadded, for the next layer or the final norm to add so. Where every norm takes its add, a
        micro-batch runs no residual add of its own, forward or backward (autograd summing the stream's grad
        from two readers): 63 bf16 adds of Llama-3.1-8B's, 1.5 ms of its micro-batch on an H200 (call 46)."""
        norm = self.input_layernorm
        x, h = add_and_norm(norm, delta, x, self._spare_columns(norm, self.self_attn, x))
        attended = self.self_attn(h, cos, sin, mask, cache, layer_idx)
        norm = self.post_attention_layernorm
        x, h = add_and_norm(norm, attended, x, self._spare_columns(norm, self.mlp, x))
        out = self.mlp(h)
        return (x, out) if defer else x + out

    @staticmethod
    def _spare_columns(norm, block, x) -> int:
        """Where the block after a norm runs a fused LoRA function, the norm leaves the columns beside its output
        that the function fills with x A^T (kernels/lora_stacked.py): no copy of x into a wider matrix."""
        return block.spare_input_columns(x) if norm.fuses(x) and eager_cuda(x) else 0


def add_and_norm(norm: RMSNorm, delta, x, spare_columns: int = 0):
    """(x + delta, norm(x + delta)), or with delta None (x, norm(x)): the add inside the norm's kernel where it
    runs (kernels/rms_norm.py's add_rms_norm), which leaves spare_columns beside its output (see
    DecoderLayer._spare_columns, asked before the add, of x)."""
    if delta is None:
        return x, norm(x, spare_columns)
    if norm.fuses(x) and x.dtype == delta.dtype:
        h, x = add_rms_norm(delta, x, norm.weight, norm.eps, spare_columns)
        return x, h
    x = x + delta  # the block after the norm decides about its own spare columns: none are left here
    return x, norm(x)


class DecoderStack(nn.Module):
    """Hugging Face's `model.*` part: embeddings, layers, final norm."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rope, config.head_dim)


@dataclass(frozen=True)
class PackedDocuments:
    """Where the documents of a packed batch start and end over its flattened (B * T) tokens."""

    cu_seqlens: torch.Tensor  # (documents + 1,) int32, on the model's device
    max_seqlen: int


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None


class CausalLM(nn.Module):
    lm_head_fused = True  # the chunked linear + cross-entropy kernel on CUDA (see `kernels`)
    cuda_graphs = True  # training may replay micro-batches from CUDA graphs (training/cuda_graphs.py)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.name_or_path: str | None = None  # where the weights came from (saved in adapter configs)
        self.hf_config: dict | None = None  # the checkpoint's config.json, written again by save_model
        self.lora_config = None  # set by apply_lora
        self.activation_checkpointing = "none"
        self.pinned_buffers = PinnedBuffers()  # where offloaded layer inputs wait, kept between micro-batches

    @property
    def activation_checkpointing(self) -> str | list[str]:
        """What layers keep for backward: one of nn/checkpointing.py's MODES, or a list of them, one per layer."""
        return self._activation_checkpointing

    @activation_checkpointing.setter
    def activation_checkpointing(self, modes: str | list[str]) -> None:
        # The LoRA layers (lora.py) of a checkpointed layer keep no copies made from their adapters: set it
        # after the adapters are applied (training does).
        n = len(self.model.layers)
        per_layer = [modes] * n if isinstance(modes, str) else list(modes)
        if len(per_layer) != n:
            raise ValueError(f"activation_checkpointing: {len(per_layer)} modes for {n} layers")
        self._activation_checkpointing = modes
        for layer, mode in zip(self.model.layers, per_layer):
            for m in layer.modules():
                if hasattr(m, "in_checkpointed_layer"):
                    m.in_checkpointed_layer = mode != "none"

    # What disable_kernels names. cuda_graphs: training micro-batches of one shape replayed from a CUDA graph
    # (training/cuda_graphs.py); the model only carries the switch.
    KERNELS = ("rms_norm", "rope", "swiglu", "lora_mlp", "lora_qkv", "cross_entropy", "cuda_graphs")

    @property
    def kernels(self) -> bool:
        """Fused kernels on CUDA tensors (the default); False: the plain PyTorch path everywhere, the
        reference the kernels are measured and debugged against. CPU tensors always take the PyTorch path."""
        return self.lm_head_fused

    @kernels.setter
    def kernels(self, enabled: bool) -> None:
        self.disable_kernels(() if enabled else self.KERNELS)

    def tile_mlp_from(self, tokens: int, chunk_tokens: int | None = None) -> None:
        """Every MLP runs a chunk of tokens at a time (chunk_tokens, or as it was) from passes of `tokens` on
        (nn/tiled_mlp.py): what the memory planner chooses when every layer offloaded does not fit
        (lorafit/memory.py)."""
        for m in self.modules():
            if isinstance(m, MLP):
                m.tile_tokens = tokens if m.tile_tokens is None else min(m.tile_tokens, tokens)
                m.tile_chunk_tokens = chunk_tokens or m.tile_chunk_tokens

    @property
    def mlp_tiling(self) -> list[tuple[int | None, int]]:
        """Each MLP's (tile_tokens, tile_chunk_tokens): what a planner that tried tiling puts back."""
        return [(m.tile_tokens, m.tile_chunk_tokens) for m in self.modules() if isinstance(m, MLP)]

    @mlp_tiling.setter
    def mlp_tiling(self, tiling: list[tuple[int | None, int]]) -> None:
        for m, (tokens, chunk) in zip((m for m in self.modules() if isinstance(m, MLP)), tiling, strict=True):
            m.tile_tokens, m.tile_chunk_tokens = tokens, chunk

    def disable_kernels(self, names) -> None:
        """Switches the named kernels (of KERNELS) off and all others on."""
        unknown = set(names) - set(self.KERNELS)
        if unknown:
            raise ValueError(f"unknown kernels {sorted(unknown)}; they are {', '.join(self.KERNELS)}")
        on = {name: name not in names for name in self.KERNELS}
        self.lm_head_fused, self.cuda_graphs = on["cross_entropy"], on["cuda_graphs"]
        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.fused = on["rms_norm"]
            elif isinstance(m, Attention):
                m.fused, m.fused_lora = on["rope"], on["lora_qkv"]
            elif isinstance(m, MLP):
                m.fused, m.fused_lora = on["swiglu"], on["lora_mlp"]

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        last_logits_only: bool = False,
        documents: PackedDocuments | None = None,
        loss_reduction: str = "mean",
    ) -> CausalLMOutput:
        """input_ids: (B, T).

        attention_mask: None, a (B, S) 0/1 padding mask over cached + new tokens, or a ready boolean
        (B, 1, T, S) mask (True = may attend). position_ids: (B, T); by default counted from the padding
        mask, or from the cache length. With labels, returns only the loss: the mean cross-entropy over the
        label tokens that are not -100 after the shift (token t predicts label t + 1); otherwise the logits,
        of the last position only when `last_logits_only` (generation needs no more). documents: a packed
        batch's boundaries (data.packing's "cu_seqlens"): on a GPU they replace the dense block mask.
        loss_reduction "none": the loss is (B, T-1) float32, each label token's cross-entropy (its -log p)
        and 0 where the target is -100; what DPO and GRPO sum per sequence.
        """
        if loss_reduction not in ("mean", "none"):
            raise ValueError(f"loss_reduction must be 'mean' or 'none', not {loss_reduction!r}")
        B, T = input_ids.shape
        past = cache.length if cache is not None else 0
        if self.config.sliding_window is not None and past + T > self.config.sliding_window:
            raise ValueError(
                f"sequence of {past + T} tokens exceeds this model's sliding attention window "
                f"({self.config.sliding_window}), which lorafit does not implement yet"
            )
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, B, T, past, input_ids.device)
        x = self.model.embed_tokens(input_ids)  # (B, T, C)
        mask = None
        if documents is not None and self.kernels and cache is None and can_run_varlen(x.device, _compute_dtype(x)):
            mask = documents  # each layer's attention runs the varlen kernel on these boundaries
        elif attention_mask is not None and attention_mask.dim() == 4:
            mask = attention_mask
        elif attention_mask is not None and not (cache is None and is_right_padded(attention_mask)):
            mask = padding_causal_mask(attention_mask, T)
        # A right-padded batch without a cache needs no mask: padding comes after every real token, so
        # causality alone keeps real tokens from seeing it, and SDPA takes its faster is_causal path.

        cos, sin = self.model.rotary_emb(position_ids, x.dtype)  # (B, 1, T, D)
        modes = self.activation_checkpointing
        modes = [modes] * len(self.model.layers) if isinstance(modes, str) else modes
        chain = OffloadChain(self.pinned_buffers) if "offload" in modes else None
        delta = None  # the last layer's MLP output, not yet added to x (DecoderLayer.forward's defer)
        # Where the next layer takes it unadded too (takes_delta; the final norm does), a layer leaves the add
        # to it; a layer recomputed from its input ("layers") takes that input whole.
        takes = [takes_delta(m, x) for m in modes] + [True]
        for i, layer in enumerate(self.model.layers):
            if cache is not None:
                x = layer(x, cos, sin, mask, cache, i)
            elif takes[i]:
                out = run_layer(layer, modes[i], x, cos, sin, mask, chain=chain, delta=delta, defer=takes[i + 1])
                x, delta = out if takes[i + 1] else (out, None)
            else:
                x = run_layer(layer, modes[i], x, cos, sin, mask, chain=chain)
        if cache is not None:
            cache.advance(T)
        _, x = add_and_norm(self.model.norm, delta, x)

        if labels is None:
            if last_logits_only:
                x = x[:, -1:]
            return CausalLMOutput(logits=self.lm_head(x))  # (B, T, V)
        # Only positions that predict a label reach the output layer: with prompts masked (the SFT default)
        # that skips most of the (tokens x vocabulary) logits, about a quarter of a small model's compute.
        targets = labels[:, 1:]  # token t predicts label t + 1
        if self.lm_head_fused and x.is_cuda and isinstance(self.lm_head, nn.Linear) and loss_reduction == "mean":
            # Chunked: never the (N, V) logits (2 GiB in float32 for 4k tokens of Llama 3's 128k vocabulary).
            # Every position goes in and the kernel skips the -100 targets: selecting the label rows first
            # would wait for the GPU (a data-dependent shape) and stall the launch queue.
            hidden = x[:, :-1].reshape(-1, x.shape[-1])  # (B * (T-1), C)
            return CausalLMOutput(loss=linear_cross_entropy(hidden, self.lm_head.weight, targets.reshape(-1)))
        keep = targets != -100  # (B, T-1)
        logits = self.lm_head(x[:, :-1][keep]).float()  # (N, V), N = label tokens
        if loss_reduction == "none":
            token_losses = F.cross_entropy(logits, targets[keep], reduction="none")  # (N,)
            return CausalLMOutput(loss=logits.new_zeros(targets.shape).masked_scatter(keep, token_losses))
        if logits.shape[0] == 0:  # nothing to learn here: a zero that still connects to the graph
            return CausalLMOutput(loss=logits.sum())
        return CausalLMOutput(loss=F.cross_entropy(logits, targets[keep]))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the layers' matmuls produce: autocast's when it is on, else the activations'."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def default_position_ids(attention_mask, B, T, past, device) -> torch.Tensor:
    """Positions count real tokens only, so a left-padded prompt starts at position 0 like an unpadded one."""
    if attention_mask is None or attention_mask.dim() != 2:
        return torch.arange(past, past + T, device=device).expand(B, T)
    positions = attention_mask.long().cumsum(-1) - 1  # (B, S)
    return positions[:, -T:].clamp(min=0)


def is_right_padded(attention_mask: torch.Tensor) -> bool:
    """(B, S) 0/1 mask: every row is real tokens followed by padding only."""
    return bool((attention_mask[:, 1:] <= attention_mask[:, :-1]).all())


def padding_causal_mask(attention_mask: torch.Tensor, T: int) -> torch.Tensor:
    """(B, S) 0/1 padding mask -> (B, 1, T, S) boolean: causal, and never attending to padding.

    The T queries are the last T of the S positions. A query sitting on a padding position would see no
    key at all (and SDPA would return NaN), so every query may always see itself; such rows are thrown away.
    """
    S = attention_mask.shape[-1]
    query_pos = torch.arange(S - T, S, device=attention_mask.device)[:, None]  # (T, 1)
    key_pos = torch.arange(S, device=attention_mask.device)[None, :]  # (1, S)
    allowed = (key_pos <= query_pos) & attention_mask.bool()[:, None, None, :]  # (B, 1, T, S)
    return allowed | (key_pos == query_pos)
