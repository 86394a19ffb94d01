"""OUTPUT_DIR/metrics.jsonl: one JSON row per optimizer step (and per evaluation), appended and flushed;
and the same numbers for TensorBoard in OUTPUT_DIR/tensorboard when the `tensorboard` package is installed.

Appending means a resumed run continues the same file; rows after the resumed step are dropped first so
that the file never holds a step twice.
"""

import json
from pathlib import Path


class MetricsLog:
    def __init__(self, output_dir, resume_from_step: int | None = None):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from_step is None:
            self.path.write_text("")
        elif self.path.is_file():
            kept = [r for r in read_metrics(self.path) if r["step"] <= resume_from_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.tensorboard = _tensorboard_writer(self.path.parent / "tensorboard")

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, row["step"])
            self.tensorboard.flush()


def _tensorboard_writer(directory: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is optional: metrics.jsonl and the report carry the same numbers
        return None
    return SummaryWriter(str(directory))


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
