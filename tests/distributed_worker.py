"""One rank of a data-parallel test run, started by torchrun (tests/test_distributed.py):

    torchrun --nproc-per-node 2 tests/distributed_worker.py CONFIG.yaml [--resume] [--stop-at-step K]

Like `lorafit train`, but with stop_at_step (an interruption at a known step, for the resume test),
--audit: every rank prints what it created, wrote, renamed or removed under train.output_dir (Python's audit
events: open for writing, mkdir, rename/replace, remove, rmtree), so a test can check that rank 0 alone did,
and --nf4-bytes: every rank prints how many bytes of the NF4 layers' stored state it holds after training."""

import argparse
import os
import sys

import torch

from lorafit import Config
from lorafit.recipes import train
from lorafit.training.distributed import init_distributed, shutdown


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-at-step", type=int, default=None)
    parser.add_argument("--audit", action="store_true")
    parser.add_argument("--nf4-bytes", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    config = Config.from_yaml(args.config)
    written = []
    if args.audit:
        watch_files(os.path.abspath(config.train.output_dir), written)
    dist = init_distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]),
                            "cpu")
    try:
        result = train(config, resume=args.resume, log=lambda *_: None, progress=False,
                       stop_at_step=args.stop_at_step, dist=dist)
        print(f"rank {dist.rank}: {result.steps} steps, losses {result.losses}", flush=True)
        if args.audit:
            print(f"rank {dist.rank} wrote {len(written)}: {sorted(set(written))[:5]}", flush=True)
        if args.nf4_bytes:
            held, whole, tensors = nf4_bytes(result.model)
            print(f"rank {dist.rank} holds {held} of {whole} NF4 bytes in {tensors} tensors", flush=True)
    finally:
        shutdown(dist)


def nf4_bytes(model) -> tuple[int, int, int]:
    """(bytes this rank holds, bytes of the whole model, tensors) of the NF4 layers' stored state: their
    shards where FSDP2 sharded them (DTensors), else the tensors themselves."""
    from torch.distributed.tensor import DTensor

    from lorafit.nn.nf4 import NF4Linear

    state = [getattr(m, name) for m in model.modules() if isinstance(m, NF4Linear)
             for name in ("weight", "absmax", "nested_scales", "nested_offset") if getattr(m, name) is not None]
    local = [t.to_local() if isinstance(t, DTensor) else t for t in state]
    return (sum(t.numel() * t.element_size() for t in local), sum(t.numel() * t.element_size() for t in state),
            len(state))


def watch_files(root: str, written: list) -> None:
    def hook(event, args):
        if event == "open":
            mode, flags = args[1], args[2]  # builtins.open: a mode string; os.open: None and the flags
            by_mode = isinstance(mode, str) and any(c in mode for c in "wax+")
            by_flags = mode is None and isinstance(flags, int) and flags >= 0 and flags & (
                os.O_WRONLY | os.O_RDWR | os.O_CREAT)
            if not (by_mode or by_flags):
                return
        elif event not in ("os.mkdir", "os.rename", "os.replace", "os.remove", "os.rmdir", "shutil.rmtree"):
            return
        path = args[0]
        if isinstance(path, (str, bytes, os.PathLike)) and os.path.abspath(os.fsdecode(path)).startswith(root):
            written.append(f"{event} {os.fsdecode(path)}")

    sys.addaudithook(hook)


if __name__ == "__main__":
    main()
