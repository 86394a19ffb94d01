"""OUTPUT_DIR/metrics.jsonl: one JSON row per optimizer step (and per evaluation), appended and flushed.

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

    def write(self, row: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def read_metrics(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
