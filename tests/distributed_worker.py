"""One rank of a data-parallel test run, started by torchrun (tests/test_distributed.py):

    torchrun --nproc-per-node 2 tests/distributed_worker.py CONFIG.yaml [--resume] [--stop-at-step K]

Like `lorafit train`, but with stop_at_step (an interruption at a known step, for the resume test)."""

import argparse
import os

import torch

from lorafit import Config
from lorafit.recipes import train
from lorafit.training.distributed import init_distributed, shutdown


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--stop-at-step", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)  # two ranks on a 2-core machine
    dist = init_distributed(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"]),
                            "cpu")
    try:
        result = train(Config.from_yaml(args.config), resume=args.resume, log=lambda *_: None, progress=False,
                       stop_at_step=args.stop_at_step, dist=dist)
        print(f"rank {dist.rank}: {result.steps} steps, losses {result.losses}", flush=True)
    finally:
        shutdown(dist)


if __name__ == "__main__":
    main()
