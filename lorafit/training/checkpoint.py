"""Checkpoints that survive a crash at any moment and resume a run exactly.

    OUTPUT_DIR/checkpoints/step-000100/   weights (PEFT adapter, or trainable tensors for full fine-tuning),
                                          optimizer.pt, scheduler.pt, rng.pt, state.json
    OUTPUT_DIR/checkpoints/latest         the name of the newest complete checkpoint, written last

A checkpoint is written into a temporary folder that is renamed into place when complete, and the `latest`
marker is replaced atomically afterwards: whatever moment a run dies at, `latest` names a whole checkpoint.

With several ranks rank 0 alone writes: the same files, the weights and optimizer state gathered whole when
FSDP2 shards them (the adapter inside is an ordinary PEFT adapter), rng.pt with every rank's generators.
Every rank reads the checkpoint to resume (a filesystem all nodes see), with as many ranks as wrote it: the
data position and the generators are per rank.
"""

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..adapter_io import WEIGHTS_NAME, adapter_tensors, load_adapter_weights, save_adapter
from ..errors import LorafitError
from .distributed import (SINGLE, Distributed, full_state, gathered, is_sharded, load_full_weights,
                          load_optimizer_state, optimizer_state)

LATEST = "latest"


def checkpoints_dir(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def save_checkpoint(output_dir, model, optimizer, scheduler, state: dict, keep: int = 2,
                    dist: Distributed = SINGLE) -> Path:
    """state: JSON-able trainer state (step, data position, ...). Keeps the newest `keep` checkpoints.
    Several ranks: every rank calls it (gathering is collective); it returns once rank 0 has written."""
    root = checkpoints_dir(output_dir)
    name = f"step-{state['step']:06d}"
    final, tmp = root / name, root / f".{name}.partial"
    lora = getattr(model, "lora_config", None) is not None
    adapter = gathered(adapter_tensors(model)) if lora and is_sharded(model) else None
    trainable = None if lora else {n: t.contiguous() for n, t in full_state(model, trainable_only=True).items()}
    optimizer_tensors = optimizer_state(model, optimizer, dist)
    rng = dist.gather_objects(_rng_state())
    if dist.is_main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if lora:
            save_adapter(model, tmp / "adapter", tensors=adapter)
        else:
            save_file(_untie(trainable), tmp / "trainable.safetensors")
        torch.save(optimizer_tensors, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        torch.save(rng[0] if not dist.enabled else {"ranks": rng}, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        shutil.rmtree(final, ignore_errors=True)  # a rerun of the same step replaces its old checkpoint
        os.replace(tmp, final)
        _write_atomically(root / LATEST, name)
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def latest_checkpoint(output_dir) -> Path | None:
    marker = checkpoints_dir(output_dir) / LATEST
    if not marker.is_file():
        return None
    path = marker.parent / marker.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(path: Path, model, optimizer, scheduler, dist: Distributed = SINGLE) -> dict:
    """Restores weights, optimizer, scheduler and RNG states in place; returns the trainer state. Several
    ranks: every rank calls it; each takes its own generators' states."""
    rng = torch.load(path / "rng.pt", weights_only=True)
    ranks = len(rng["ranks"]) if "ranks" in rng else 1
    if ranks != dist.world_size:  # the data position and the generators are per rank
        raise LorafitError(f"{path} was written by a run of {ranks} process(es); resume it with as many "
                           f"(this run has {dist.world_size})")
    if (path / "adapter").is_dir() and not is_sharded(model):
        load_adapter_weights(model, path / "adapter")
    elif (path / "adapter").is_dir():
        names = {id(p): n for n, p in model.named_parameters()}
        by_file_name = {k: names[id(p)] for k, p in adapter_tensors(model).items()}
        tensors = load_file(path / "adapter" / WEIGHTS_NAME)
        load_full_weights(model, {by_file_name[k]: v for k, v in tensors.items()})
    else:
        load_full_weights(model, load_file(path / "trainable.safetensors"))
    # weights_only: a checkpoint folder is data, even one copied from elsewhere.
    load_optimizer_state(model, optimizer, torch.load(path / "optimizer.pt", weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    _set_rng_state(rng["ranks"][dist.rank] if "ranks" in rng else rng)
    return json.loads((path / "state.json").read_text())


def require_latest(output_dir) -> Path:
    path = latest_checkpoint(output_dir)
    if path is None:
        raise LorafitError(f"{checkpoints_dir(output_dir)}: no checkpoint to resume from")
    return path


def _untie(tensors: dict) -> dict:
    """safetensors refuses two names on one storage (tied embeddings): keep one name per storage."""
    seen, out = set(), {}
    for name, t in tensors.items():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            out[name] = t
    return out


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
