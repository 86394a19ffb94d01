"""`train.batch_size: auto`: the largest micro-batch that fits, chosen before the first step, with the
accumulation that keeps the configured effective batch.

The candidates are the divisors of each rank's share of the effective batch (16 on one rank: 16, 8, 4, 2,
1), so accumulation stays whole and micro-batch x accumulation x ranks stays what was asked for; the
transformers batch finder halves the batch and leaves the effective batch to shrink with it. The memory
estimate (lorafit/memory.py) gives the largest candidate under the budget; on a GPU one forward and
backward of a full-length micro-batch then tries it for real, and a smaller candidate is taken while the
try runs out of memory (the estimate was 2-10% off on the H200, benchmarks/results.jsonl: the try catches
what it misses). Training's own recovery (recipes/sft.py) stays behind both.

With activation_checkpointing: auto, a micro-batch that fits without recomputing anything is preferred: on
the anchor workload offloading cost 35% of the tokens/s (8B) while a larger micro-batch gained at most a few
percent. When even one example needs checkpointing, the micro-batch is 1 and the checkpointing plan offloads
what it must.
"""

from collections.abc import Callable

import torch

from ..memory import GiB, estimate_training_memory


def candidates(per_rank: int) -> list[int]:
    """The micro-batches that divide a rank's share of the effective batch, largest first."""
    return [b for b in range(per_rank, 0, -1) if per_rank % b == 0]


def largest_fitting(sizes: list[int], fits_estimate: Callable[[int], bool],
                    fits_for_real: Callable[[int], bool] | None = None) -> int:
    """The first of `sizes` (largest first) the estimate fits and, when given, a real try confirms; the
    smallest when none does (training then checkpoints what it must, or says what to change)."""
    for b in sizes:
        if fits_estimate(b) and (fits_for_real is None or fits_for_real(b)):
            return b
    return sizes[-1]


def choose_micro_batch(config, model, budget: int, world_size: int = 1,
                       try_step: Callable[[int], bool] | None = None) -> tuple[int, str]:
    """-> (micro-batch, a line for the log). model: prepared for training (trainable weights in float32;
    the meta device will do without try_step). budget: bytes. try_step(rows): one real step of that many
    full-length sequences fits (see `fits_one_step`); None trusts the estimate."""
    t = config.train
    per_rank = t.batch_split(world_size, micro_batch=1)[1]  # the rank's share of the effective batch
    rows = 2 if t.recipe == "dpo" else 1  # a DPO example is a pair: two sequences
    seq = config.model.max_seq_length
    # Without checkpointing unless asked for; auto prefers that (module docstring).
    modes = ["none" if t.activation_checkpointing == "auto" else t.activation_checkpointing] * model.config.num_layers
    element_size = model.model.embed_tokens.weight.element_size()

    def estimate(b: int):
        return estimate_training_memory(model, b * rows * seq, modes, element_size=element_size)

    def fits_for_real(b: int) -> bool:
        model.activation_checkpointing = modes
        return try_step(b * rows)

    sizes = candidates(per_rank)
    micro = largest_fitting(sizes, lambda b: estimate(b).total <= budget, fits_for_real if try_step else None)
    line = (f"micro-batch auto: {micro} (the largest of {', '.join(map(str, sizes))} that fits "
            f"{budget / GiB:.1f} GiB at {seq} tokens{' without recomputation' if modes[0] == 'none' else ''}: "
            f"estimated {estimate(micro).total / GiB:.1f} GiB{', and one step tried' if try_step else ''}), "
            f"accumulation {per_rank // micro}: effective batch {micro} x {per_rank // micro} x {world_size} = "
            f"{per_rank * world_size}")
    return micro, line


def fits_one_step(model, rows: int, seq_len: int, autocast, device: torch.device) -> bool:
    """One forward and backward of a full-length micro-batch of random tokens; False if it ran out of memory.
    AdamW's two float32 moments, which the step does not make, are held aside meanwhile; the gradients are
    dropped after. The random state is left as it was, so the run is the same as one without the try."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    was_training = model.training
    model.train()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        reserved = tokens = loss = None
        try:
            reserved = torch.empty(trainable * 8, dtype=torch.uint8, device=device)
            tokens = torch.randint(model.config.vocab_size, (rows, seq_len), device=device)
            with autocast:
                loss = model(tokens, labels=tokens).loss
            loss.backward()
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            del reserved, tokens, loss
            model.zero_grad(set_to_none=True)
            model.train(was_training)
            if device.type == "cuda":
                torch.cuda.empty_cache()

