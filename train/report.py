"""report.md for a run: the stage table, comparisons, and a PNG of the loss curves.

Written by the pipeline at the end of every launch (and safe to rerun): it reads only the
manifest and each stage's metrics.jsonl, so it never needs the models.
"""

from __future__ import annotations

from pathlib import Path

from train.metrics import read_metrics

SHOWN = (
    "eval_loss",
    "eval_ppl",
    "eval_accuracy",
    "kl_to_teacher",
    "unigram_ppl",
    "bytes_per_token",
)


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    cells = lambda r: (str(c).ljust(w) for c, w in zip(r, widths, strict=True))
    line = lambda r: "| " + " | ".join(cells(r)) + " |"
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), sep, *[line(r) for r in rows]])


def stage_table(order, kinds: dict[str, str], manifest: dict) -> str:
    rows = []
    for name in order:
        e = manifest["stages"].get(name, {})
        m = e.get("metrics") or {}
        shown = ", ".join(f"{k}={_fmt(m[k])}" for k in SHOWN if k in m)
        rows.append([name, kinds[name], e.get("status", "pending"), str(e.get("step", "")), shown])
    return format_table(rows, ["stage", "kind", "status", "step", "metrics"])


def plot_losses(run_dir: Path, order) -> Path | None:
    """train loss and eval loss against tokens seen, one line per training stage."""
    curves = {}
    for name in order:
        path = run_dir / name / "metrics.jsonl"
        if path.exists():
            recs = read_metrics(path)
            train = [
                (r["step"], r["loss"]) for r in recs if r.get("kind") == "train" and "loss" in r
            ]
            evals = [
                (r["step"], r["eval_loss"])
                for r in recs
                if r.get("kind") == "eval" and "eval_loss" in r
            ]
            if train:
                curves[name] = (train, evals)
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, (train, evals) in curves.items():
        axes[0].plot(*zip(*train, strict=True), label=name)
        if evals:
            axes[1].plot(*zip(*evals, strict=True), marker="o", label=name)
    for ax, title in zip(axes, ["train loss", "eval loss (held-out next-token CE)"], strict=True):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out = run_dir / "losses.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def write_report(
    *, run_dir: Path, run_name: str, order, kinds, manifest: dict, extra: str = ""
) -> str:
    table = stage_table(order, kinds, manifest)
    text = f"# Run {run_name}\n\n{table}\n"
    if extra:
        text += f"\n{extra}\n"
    png = plot_losses(run_dir, order)
    if png is not None:
        text += f"\n![losses]({png.name})\n"
    return text
