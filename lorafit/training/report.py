"""The end-of-run report: PNG plots of the metrics and a short markdown summary, in OUTPUT_DIR."""

from pathlib import Path

from .metrics import read_metrics


def write_report(output_dir, advice_table: str, summary: dict) -> list[Path]:
    """Returns the files written. Plots need matplotlib; without it the markdown says so."""
    output_dir = Path(output_dir)
    rows = read_metrics(output_dir / "metrics.jsonl")
    train = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "eval_loss" in r]
    written = []
    plots = _plot(output_dir, train, evals)
    written += plots
    lines = ["# lorafit run report", ""]
    lines += [f"- {k.replace('_', ' ')}: {v}" for k, v in summary.items()]
    if train:
        lines.append(f"- loss: first {train[0]['loss']:.4f}, last {train[-1]['loss']:.4f}")
    if evals:
        lines.append(f"- eval loss: first {evals[0]['eval_loss']:.4f}, last {evals[-1]['eval_loss']:.4f}")
    lines += ["", "## Settings against the guide", "", "```", advice_table, "```", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots] or ["(no plots: `pip install matplotlib` to get them)"]
    report = output_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return written + [report]


def _plot(output_dir: Path, train: list[dict], evals: list[dict]) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, never a window
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    panels = [("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "gradient norm")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, (key, title) in zip(axes, panels):
        points = [(r["step"], r[key]) for r in train if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), label=f"train {key}" if key == "loss" else None)
        if key == "loss" and evals:
            ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    path = output_dir / "training.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
