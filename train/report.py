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
    "accuracy_init",
    "accuracy",
    "accuracy_sampled_init",
    "accuracy_sampled",
    "reward_mean",
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
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    out = run_dir / "losses.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def rl_summary(run_dir: Path, order, kinds, manifest: dict) -> str:
    """For each RL stage: held-out accuracy before and after, and the reward curve."""
    parts = []
    for name in order:
        e = manifest["stages"].get(name, {})
        m = e.get("metrics") or {}
        if kinds[name] != "rl" or e.get("status") != "done":
            continue
        lines = [f"### RL stage `{name}`", ""]
        for key, label in (("accuracy", "greedy"), ("accuracy_sampled", "sampled")):
            if f"{key}_init" in m and key in m:
                a, b = m[f"{key}_init"], m[key]
                lines.append(
                    f"- held-out accuracy ({label}): {a:.1%} before -> {b:.1%} after "
                    f"({(b - a) * 100:+.1f} points)"
                )
        path = run_dir / name / "metrics.jsonl"
        curve = [
            (r["step"], r["reward_mean"])
            for r in (read_metrics(path) if path.exists() else [])
            if r.get("kind") == "train" and "reward_mean" in r
        ]
        if curve:
            lines += ["", "reward curve (training rollouts, mean reward per logged interval):", ""]
            lines.append(format_table([[str(s), f"{r:.3f}"] for s, r in curve], ["step", "reward"]))
            png = _plot_curve(run_dir / f"{name}_reward.png", curve, title=f"{name}: reward")
            lines.append(f"\n![{name} reward]({png.name})")
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


def _plot_curve(path: Path, curve, *, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*curve, strict=True), marker="o")
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


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
    rl = rl_summary(run_dir, order, kinds, manifest)
    if rl:
        text += f"\n## Post-training\n\n{rl}\n"
    return text
