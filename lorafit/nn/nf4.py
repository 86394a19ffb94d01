"""NF4, the 4-bit NormalFloat weight format of QLoRA (Dettmers et al., 2023), in pure PyTorch.

This file is the specification, the test oracle and the CPU path of the 4-bit base weights; a fused GPU
kernel replaces `dequantize_nf4` later without changing the format. The format is bitsandbytes' (the de
facto standard: "-bnb-4bit" checkpoints on the Hub store it), and the tests compare with bitsandbytes bit
for bit (codes, scales, and the dense weight read back from its stored state):

- The weight is flattened row-major and cut into blocks of 64 consecutive values. Each block is divided by
  its absolute maximum ("absmax"), and each value becomes the index (0..15) of the nearest NF4 code value.
- Two indices share a byte: the first of each pair in the high nibble. An odd count gets one padding index.
- Double quantisation (QLoRA §3, on by default) stores the absmax values themselves in 8 bits: their mean is
  subtracted (the "offset"), then they are quantised in blocks of 256 with the signed "dynamic" 8-bit code,
  each block keeping one float32 scale. This takes the scales from 0.5 to about 0.127 bits per parameter.

Storage per parameter: 4 bits + 32/64 bits of absmax = 0.5625 bytes; with double quantisation
4 + 8/64 + 32/(64·256) bits ≈ 0.516 bytes (`bytes_per_parameter` measures it).
"""

import json
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

BLOCK_SIZE = 64  # QLoRA's choice: small enough that one outlier spoils few values, 0.5 bits/param of absmax
NESTED_BLOCK_SIZE = 256  # QLoRA's choice for the absmax values (0.125 bits/param for their fp32 scales)
COMPUTE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# The 16 NF4 values. Definition (QLoRA appendix E): quantiles of N(0, 1), normalised to [-1, 1], with an
# exact zero and asymmetric halves so that zero needs no code of its own:
#     positives = Φ⁻¹(linspace(p, 0.5, 9)[:-1])      8 values
#     negatives = -Φ⁻¹(linspace(p, 0.5, 8)[:-1])     7 values
#     p = 1 - (1/(2·15) + 1/(2·16)) / 2 ≈ 0.9677     (the outermost quantile stays finite)
# then all are divided by the largest. Recomputing this in float64 lands within 2e-7 of each value (a few
# float32 ulps), not on it; the float32 values below are the ones every NF4 implementation and checkpoint
# uses, so they are written out (tests/test_nf4.py re-derives them from the definition).
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)


def dynamic_code() -> torch.Tensor:
    """The signed 8-bit "dynamic" code (Dettmers 2015, "8-Bit Approximations for Parallelism in Deep
    Learning") that bitsandbytes uses for the absmax values: a sign, a decade 10^(k-6) for k = 0..6, and
    within decade k the centres of 2^k equal steps of [0.1, 1] (small magnitudes get few, coarse values;
    large ones many, fine values); plus 0 and 1. 2·(1+2+...+64) + 2 = 256 sorted values in [-0.993, 1].

    Computed in float32 step by step (linspace, centre, scale), which reproduces bitsandbytes' table bit
    for bit (tested).
    """
    parts = [torch.zeros(1), torch.ones(1)]
    for k in range(7):
        edges = torch.linspace(0.1, 1.0, 2**k + 1, dtype=torch.float32)
        centres = (edges[:-1] + edges[1:]) / 2 * 10.0 ** (k - 6)
        parts += [centres, -centres]
    return torch.cat(parts).sort().values


# ---- quantisation -----------------------------------------------------------------------------------


def _blocks(flat: torch.Tensor, block: int) -> torch.Tensor:
    """(n,) -> (ceil(n / block), block), the tail zero-padded (a zero never raises a block's absmax)."""
    padding = -flat.numel() % block
    return (F.pad(flat, (0, padding)) if padding else flat).view(-1, block)


def _quantize_blockwise(values: torch.Tensor, code: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Absmax quantisation of a 1-D float32 tensor onto a sorted code book, by nearest code value.

    Returns (indices (n,) uint8, absmax (blocks,) float32). Values are multiplied by the reciprocal of their
    block's absmax and rounded to the nearest code, a value exactly between two codes taking the lower one.
    This is bitsandbytes' PyTorch path bit for bit, except that it divides in a partial last block (an ulp
    apart at most). Its CUDA kernels break some exact ties the other way (measured on an H200: 4 of the
    8.4 M code bytes of a 4096 x 4096 float32 weight differed, none for bf16 / fp16 weights; 8-bit absmax
    codes differed for 2 of 917 k values, and on exact midpoints). An all-zero block gets absmax 0 and the
    code of 0.
    """
    blocks = _blocks(values, block)
    absmax = blocks.abs().amax(dim=1)
    if not torch.isfinite(absmax).all():
        raise ValueError("cannot quantise a weight that contains inf or NaN")
    # The clamp keeps an all-zero block finite (0 · 1/tiny = 0) instead of 0 · inf = NaN.
    scaled = blocks * (1.0 / absmax.clamp(min=torch.finfo(torch.float32).tiny))[:, None]
    midpoints = (code[:-1] + code[1:]) / 2
    # bucketize(right=False) gives i with midpoints[i-1] < x <= midpoints[i]: the nearest code, ties down.
    # Rounding may push x a hair past ±1; it still lands on the outermost code, so no clamp is needed.
    indices = torch.bucketize(scaled, midpoints.to(scaled.device), out_int32=True)
    return indices.view(-1)[: values.numel()].to(torch.uint8), absmax


_ZERO_INDEX = 7  # NF4_CODE[7] == 0: padding decodes to zero


def _pack(indices: torch.Tensor) -> torch.Tensor:
    """(n,) indices 0..15 -> (ceil(n / 2),) bytes, the first of each pair in the high nibble."""
    if indices.numel() % 2:
        indices = F.pad(indices, (0, 1), value=_ZERO_INDEX)
    pairs = indices.view(-1, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def quantize_nf4(weight: torch.Tensor, double_quant: bool = True) -> dict[str, torch.Tensor]:
    """Quantises a floating-point tensor (any shape; bf16, fp16 or fp32) to NF4 on its own device.

    Returns the stored tensors: "weight" (packed uint8 codes) and "absmax" (float32 per block of 64), or,
    with double quantisation, "absmax" as uint8 codes plus "nested_scales" (float32 per block of 256
    absmax values) and "nested_offset" (float32 scalar).
    """
    if not weight.is_floating_point() or weight.dtype not in COMPUTE_DTYPES:
        raise ValueError(f"NF4 quantises bfloat16, float16 or float32 tensors, not {weight.dtype}")
    code = NF4_CODE.to(weight.device)
    indices, absmax = _quantize_blockwise(weight.detach().reshape(-1).float(), code, BLOCK_SIZE)
    state = {"weight": _pack(indices)}
    if not double_quant:
        return state | {"absmax": absmax}
    # Absmax values are all positive and similar: centring them on their mean lets the signed 8-bit code
    # spend its resolution on their spread rather than on their common size.
    offset = absmax.mean()
    nested, nested_scales = _quantize_blockwise(absmax - offset, dynamic_code().to(weight.device), NESTED_BLOCK_SIZE)
    return state | {"absmax": nested, "nested_scales": nested_scales, "nested_offset": offset}


# ---- dequantisation: a torch.library op, so that torch.compile and the meta device see through it ------


@torch.library.custom_op("lorafit::nf4_dequantize", mutates_args=())
def dequantize_nf4(
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    nested_scales: torch.Tensor | None,
    nested_code: torch.Tensor | None,
    nested_offset: torch.Tensor | None,
    shape: Sequence[int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """The dense tensor of `shape` in `dtype`. absmax is float32, or uint8 codes when nested_* are given.

    Everything is computed in float32 and rounded once at the end, with separate multiply and add (no fused
    multiply-add), which makes the result bit-identical to bitsandbytes' on CPU and CUDA (tested; only its
    AVX-512 float16 path breaks exact float16 rounding ties away from zero instead of to even).
    """
    n = _numel(shape)
    if nested_scales is not None:
        nested = nested_code.index_select(0, absmax.int())
        absmax = (_blocks(nested, NESTED_BLOCK_SIZE) * nested_scales[:, None]).view(-1)[: absmax.numel()]
        absmax = absmax + nested_offset
    # One lookup per byte into a 256 x 2 table of (high, low) code pairs, rather than unpacking nibbles; and
    # index_select, not pairs[index]: 1.2 ms instead of 4.7 ms for 442 k bytes on CPU (measured).
    pairs = torch.stack([code.repeat_interleave(16), code.repeat(16)], dim=1)  # row b: (code[b>>4], code[b&15])
    values = pairs.index_select(0, packed.int()).view(-1)
    out = (_blocks(values, BLOCK_SIZE) * absmax[:, None]).view(-1)[:n]
    return out.to(dtype).view(*shape)


@dequantize_nf4.register_fake
def _(packed, absmax, code, nested_scales, nested_code, nested_offset, shape, dtype):
    return packed.new_empty(tuple(shape), dtype=dtype)


# CUDA tensors take the Triton kernel of kernels/nf4_dequantize.py, bit-identical to the body above (which
# stays the specification and every other device's path; `dequantize_nf4.set_kernel_enabled("cuda", False)`
# switches back to it). Imported on first use: that module imports this one's constants.
@dequantize_nf4.register_kernel("cuda")
def _(packed, absmax, code, nested_scales, nested_code, nested_offset, shape, dtype):
    from ..kernels.nf4_dequantize import dequantize_nf4_triton

    return dequantize_nf4_triton(packed, absmax, code, nested_scales, nested_code, nested_offset, shape, dtype)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


# ---- the linear layer --------------------------------------------------------------------------------


class _NF4Matmul(torch.autograd.Function):
    """y = x Wᵀ with W dequantised on the fly, in forward and again in backward.

    Backward saves only the 4-bit state (0.52 bytes/param) and dequantises W a second time rather than
    keeping the dense W alive between forward and backward: that is where QLoRA's memory saving comes from.
    W is frozen, so only the input gradient is computed.
    """

    @staticmethod
    def forward(ctx, x, shape, *state):
        ctx.shape = shape
        ctx.save_for_backward(*state)
        return F.linear(x, _dense(state, shape, x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        weight = _dense(ctx.saved_tensors, ctx.shape, grad_out.dtype)
        return grad_out @ weight, None, *(None for _ in ctx.saved_tensors)


def _dense(state, shape, dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """An NF4 layer's state dequantised (into `out` if given). On CUDA in eager mode straight to the Triton
    launch: a layer's state was checked when it was made, and going through the op cost 204 us of host time a
    call on the H200's host (Llama-3.2-1B QLoRA, 336 calls a micro-batch with activations offloaded), more
    than the kernel."""
    if state[0].is_cuda and not torch.compiler.is_compiling():
        from ..kernels.nf4_dequantize import launch_dequantize

        return launch_dequantize(*state, shape, dtype, out=out)
    dense = dequantize_nf4(*state, shape, dtype)
    return dense if out is None else out.copy_(dense)


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored in NF4; forward dequantises to `compute_dtype`.

    Stored state, by the names a checkpoint gives it: `weight` (packed uint8 codes), `absmax`, and with
    double quantisation `nested_scales` and `nested_offset`. `code` / `nested_code` are the code books
    (non-persistent buffers: constants, kept per layer so that they follow the module to its device).
    `bias`, if any, stays dense and frozen. Inputs of another dtype are cast to `compute_dtype` and the
    result back.

    Why `weight`, `absmax` and `nested_scales` are frozen parameters (requires_grad=False) and not buffers:
    FSDP2's `fully_shard` shards parameters and leaves buffers whole on every rank, and these three are
    all of a layer's stored state but a 4-byte offset (0.516 bytes per weight), so as parameters a QLoRA
    base is sharded like any other frozen weight (training/distributed.py). Nothing trains them: no
    optimizer, gradient or adapter file sees a parameter that does not require grad. `nested_offset`
    stays a buffer: a 0-dim tensor has no dim 0 to shard on, and 4 bytes a layer are not worth a reshape
    that would change its checkpoint shape. The code books (1,088 bytes a layer) stay whole too.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, compute_dtype=torch.float32,
                 double_quant: bool = True, device=None):
        super().__init__()
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype must be bfloat16, float16 or float32, not {compute_dtype}")
        self.in_features, self.out_features, self.compute_dtype = in_features, out_features, compute_dtype
        self.double_quant = double_quant
        n = in_features * out_features
        blocks = -(-n // BLOCK_SIZE)
        empty = lambda size, dtype: torch.empty(size, dtype=dtype, device=device)  # noqa: E731
        frozen = lambda size, dtype: nn.Parameter(empty(size, dtype), requires_grad=False)  # noqa: E731
        self.weight = frozen((n + 1) // 2, torch.uint8)
        self.absmax = frozen(blocks, torch.uint8 if double_quant else torch.float32)
        device = self.weight.device  # also right inside a `with torch.device(...)` block
        self.register_buffer("code", NF4_CODE.to(device), persistent=False)
        if double_quant:
            self.nested_scales = frozen(-(-blocks // NESTED_BLOCK_SIZE), torch.float32)
            self.register_buffer("nested_offset", empty((), torch.float32))
            self.register_buffer("nested_code", dynamic_code().to(device), persistent=False)
        else:
            self.nested_scales = self.nested_offset = self.nested_code = None
        self.bias = nn.Parameter(empty(out_features, compute_dtype), requires_grad=False) if bias else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, compute_dtype=None,
                    double_quant: bool = True) -> "NF4Linear":
        """Quantises an (out_features, in_features) weight on its device. compute_dtype: the weight's by
        default. A bias is kept dense (in compute_dtype), frozen."""
        if weight.dim() != 2:
            raise ValueError(f"NF4Linear needs a 2-D weight (out_features, in_features), not {tuple(weight.shape)}")
        state = quantize_nf4(weight, double_quant)
        return cls._from_state(state, weight.shape, bias, compute_dtype or weight.dtype, weight.device)

    @classmethod
    def _from_state(cls, state: dict, shape, bias, compute_dtype, device) -> "NF4Linear":
        """A layer holding `state` (quantize_nf4's tensors, and optionally code books) on `device`."""
        out_features, in_features = shape
        double_quant = "nested_scales" in state
        layer = cls(in_features, out_features, bias is not None, compute_dtype, double_quant, device="meta")
        books = {"code": NF4_CODE} | ({"nested_code": dynamic_code()} if double_quant else {})
        for name, tensor in (books | state).items():
            expected = getattr(layer, name)
            if tensor.shape != expected.shape or tensor.dtype != expected.dtype:
                raise ValueError(f"NF4 {name} is {tensor.dtype} {tuple(tensor.shape)}; a {out_features}x{in_features} "
                                 f"weight needs {expected.dtype} {tuple(expected.shape)}")
            tensor = tensor.to(device)
            setattr(layer, name, nn.Parameter(tensor, requires_grad=False) if isinstance(expected, nn.Parameter)
                    else tensor)
        if bias is not None:
            # A bias still on the meta device stays a placeholder: the model loader fills it when it arrives.
            bias_device = bias.device if bias.is_meta else device
            layer.bias = nn.Parameter(bias.detach().to(bias_device, compute_dtype), requires_grad=False)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, compute_dtype=None, double_quant: bool = True) -> "NF4Linear":
        return cls.from_weight(linear.weight, linear.bias, compute_dtype, double_quant)

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) or .half() must move the quantised state but never round it (a bf16 absmax
        # or code book would shift every weight): it keeps its dtype; the bias and compute_dtype follow.
        def keep_state_dtype(t):
            out = fn(t)
            return out if t is self.bias or out.dtype == t.dtype else t.to(out.device)

        super()._apply(keep_state_dtype, recurse)
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype, device=self.weight.device)).dtype
        return self

    def _state(self) -> tuple:
        """The arguments of `dequantize_nf4` before shape and dtype."""
        return self.weight, self.absmax, self.code, self.nested_scales, self.nested_code, self.nested_offset

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out_features, in_features) weight, in compute_dtype unless told otherwise."""
        return _dense(self._state(), (self.out_features, self.in_features), dtype or self.compute_dtype)

    def dequantize_into(self, out: torch.Tensor) -> None:
        """The dense weight written into `out`, an (out_features, in_features) tensor with contiguous rows: a
        block of rows of a weight stacked from several layers (kernels/lora_stacked.py), or of a wider matrix
        (kernels/lora_mlp.py), without a copy on CUDA."""
        _dense(self._state(), (self.out_features, self.in_features), out.dtype, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (self.out_features, self.in_features)
        y = _NF4Matmul.apply(x.to(self.compute_dtype), shape, *self._state())
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        nested = ", double_quant" if self.double_quant else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"nf4 block={BLOCK_SIZE}{nested}, compute_dtype={self.compute_dtype}")


def bytes_per_parameter(module: nn.Module) -> float:
    """Bytes the NF4 layers in `module` (or `module` itself) hold per weight parameter: codes, scales and
    code books (constant, about 1.1 KB a layer), not biases."""
    layers = [m for m in module.modules() if isinstance(m, NF4Linear)]
    if not layers:
        raise ValueError(f"{type(module).__name__} contains no NF4Linear layer")
    stored = sum(t.numel() * t.element_size() for m in layers for t in [*m.parameters(), *m.buffers()]
                 if t is not m.bias)
    return stored / sum(m.in_features * m.out_features for m in layers)


# ---- bitsandbytes' serialised form: reading "-bnb-4bit" checkpoints ------------------------------------
#
# A layer quantised by bitsandbytes is saved as `<module>.weight` (the packed codes, uint8 (n/2, 1)) plus
# `<module>.weight.<piece>` tensors: absmax, quant_map (the 16 code values), for double quantisation
# nested_absmax (the per-256 scales) and nested_quant_map, and quant_state.bitsandbytes__nf4: JSON text
# stored as uint8 bytes, with shape, blocksize, quant_type, nested_blocksize and nested_offset.

BNB_PIECES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4",
              "quant_state.bitsandbytes__fp4")


class BnbLayerCollector:
    """Gathers the pieces of each bitsandbytes 4-bit layer from a checkpoint's stream of (name, tensor),
    which may come in any order and across shards, and hands each layer over once it is complete."""

    def __init__(self):
        self.pending: dict[str, dict[str, torch.Tensor]] = {}  # module name -> {piece ("" = codes): tensor}

    @staticmethod
    def piece(name: str, tensor: torch.Tensor) -> tuple[str, str] | None:
        """(module name, piece) if the tensor is part of a bitsandbytes 4-bit layer, else None."""
        module_name, found, rest = name.partition(".weight")
        if found and ((rest == "" and tensor.dtype == torch.uint8) or rest[1:] in BNB_PIECES):
            return module_name, rest[1:]
        return None

    def add(self, module_name: str, piece: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        """Returns the layer's pieces once all have arrived, else None."""
        pieces = self.pending.setdefault(module_name, {})
        pieces[piece] = tensor
        needed = {"", "absmax", "quant_map"} | ({"nested_absmax", "nested_quant_map"} if _is_nested(pieces) else set())
        if not needed <= pieces.keys() or not any(k.startswith("quant_state.") for k in pieces):
            return None
        return self.pending.pop(module_name)


def _is_nested(pieces: dict) -> bool:
    # Double-quantised absmax values are uint8 codes; plain ones float32.
    return "absmax" in pieces and pieces["absmax"].dtype == torch.uint8


def nf4_from_bnb(pieces: dict[str, torch.Tensor], bias, compute_dtype, device) -> NF4Linear:
    """An NF4Linear from one bitsandbytes layer's pieces (see BnbLayerCollector). Raises ValueError for the
    variants lorafit does not read: fp4, block sizes other than 64 / 256, another code book."""
    state_key = next(k for k in pieces if k.startswith("quant_state."))
    meta = json.loads(bytes(pieces[state_key].tolist()).decode("utf-8"))
    if meta.get("quant_type") != "nf4":
        raise ValueError(f"4-bit type {meta.get('quant_type')!r} is not supported (only nf4)")
    nested = _is_nested(pieces)
    blocks = (meta.get("blocksize"), meta.get("nested_blocksize") if nested else NESTED_BLOCK_SIZE)
    if blocks != (BLOCK_SIZE, NESTED_BLOCK_SIZE):
        raise ValueError(f"block sizes {blocks} are not supported (only {BLOCK_SIZE}, nested {NESTED_BLOCK_SIZE})")
    if not torch.equal(pieces["quant_map"].float().cpu(), NF4_CODE):
        raise ValueError("its quant_map is not the NF4 code book")
    shape = meta.get("shape")
    if not isinstance(shape, list) or len(shape) != 2:
        raise ValueError(f"quant_state shape {shape!r} is not that of a 2-D weight")
    state = {"weight": pieces[""].reshape(-1), "absmax": pieces["absmax"]}
    if nested:
        if not isinstance(meta.get("nested_offset"), (int, float)):
            raise ValueError("its quant_state lacks nested_offset")
        state |= {"nested_scales": pieces["nested_absmax"], "nested_code": pieces["nested_quant_map"],
                  "nested_offset": torch.tensor(meta["nested_offset"], dtype=torch.float32)}
    return NF4Linear._from_state(state, shape, bias, compute_dtype, device)
