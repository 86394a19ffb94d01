"""Shared by the benchmark scripts: machine description, appending to results.jsonl, timing on the GPU."""

import datetime
import json
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).with_name("results.jsonl")


def machine() -> dict:
    import torch
    import transformers

    info = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def record(benchmark: str, rows: list[dict], results: Path = RESULTS, **extra) -> None:
    """Appends one entry to `results` (the committed file by default; a GPU machine writes a copy that comes
    back and is merged by hand)."""
    import lorafit

    entry = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "benchmark": benchmark,
        "lorafit": lorafit.__version__,
        "machine": machine(),
        **extra,
        "rows": rows,
    }
    with Path(results).open("a") as f:
        f.write(json.dumps(entry) + "\n")
    print(f"appended to {results}")


def cuda_ms(fn, iters: int = 20) -> float:
    """Mean milliseconds of fn() over `iters` back-to-back calls after 3 warm-up calls, timed by CUDA events."""
    import torch

    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters
