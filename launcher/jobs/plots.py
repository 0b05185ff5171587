"""`sft-jobs report`: one PNG of loss, learning rate, eval metrics and throughput for a run or a sweep,
and the benchmark evals' scores (eval.harness) over steps when there are any."""

from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only: no display on login nodes
import matplotlib.pyplot as plt  # noqa: E402

Series = Tuple[str, List[dict]]  # (label, metrics rows); label "" for a single run
HARNESS = "harness"  # the kind of the rows harness_rows makes of a run's benchmark evals
HARNESS_STYLES = ("-", "--", "-.", ":")  # one line style per benchmark metric, cycled


def harness_rows(scores: Dict[int, Dict[str, float]]) -> List[dict]:
    """launcher.harness_results.harness_scores as rows of kind "harness" ({step, harness/<task>/<metric>...})."""
    return [{"kind": HARNESS, "step": step, **values} for step, values in sorted(scores.items())]


def harness_keys(series: List[Series]) -> List[str]:
    """Every benchmark metric of every run, in one order (a metric keeps its line style across runs)."""
    return sorted({k for _, rows in series for r in rows if r.get("kind") == HARNESS for k in r if k not in ("kind", "step")})


def short(key: str) -> str:
    return key[len(HARNESS) + 1:] if key.startswith(HARNESS + "/") else key


def column(rows: Sequence[dict], key: str) -> Tuple[List[int], List[float]]:
    points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def plot(ax, rows: Sequence[dict], key: str, label: str, **style) -> bool:
    steps, values = column(rows, key)
    if len(steps) == 1 and "marker" not in style:
        style["marker"] = "o"  # a line through one point draws nothing
    if steps:
        ax.plot(steps, values, label=label, **style)
    return bool(steps)


def named(label: str, what: str) -> str:
    return f"{label}: {what}" if label else what


def plot_runs(series: List[Series], out: Path, title: str) -> Path:
    fig = draw(series, title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100, bbox_inches="tight" if fig.legends else None)  # a legend beside the panels stays in
    plt.close(fig)
    return out.resolve()


def draw(series: List[Series], title: str):
    """Panels: loss (train lines, eval points), lr, eval perplexity/accuracy, tokens/s, and below them
    the benchmark evals' scores when there are any; one colour per run.

    One run: a legend in each panel. Several: one legend beside the panels, a colour per run and
    a line style per measure, so that a sweep's legend never covers its curves."""
    benchmarks = harness_keys(series)
    if benchmarks:  # a third row, one wide panel: each benchmark metric over the checkpoints' steps
        fig = plt.figure(figsize=(13, 12.75))
        grid = fig.add_gridspec(3, 2)
        ax_loss = fig.add_subplot(grid[0, 0])
        ax_lr, ax_eval, ax_tps = (fig.add_subplot(grid[i, j], sharex=ax_loss) for i, j in ((0, 1), (1, 0), (1, 1)))
        ax_harness = fig.add_subplot(grid[2, :], sharex=ax_loss)
    else:
        fig, ((ax_loss, ax_lr), (ax_eval, ax_tps)) = plt.subplots(2, 2, figsize=(13, 8.5), sharex=True)  # one step axis
        ax_harness = None
    ax_acc: Optional[plt.Axes] = None
    drawn = {ax: False for ax in (ax_loss, ax_lr, ax_eval, ax_tps, ax_harness) if ax is not None}
    for i, (label, rows) in enumerate(series):
        color = f"C{i % 10}"
        # Runs of earlier launchers named trained tokens/s effective_tokens_per_s.
        train = [{"trained_tokens_per_s": r.get("effective_tokens_per_s"), **r} for r in rows if r.get("kind") == "train"]
        evals = [r for r in rows if r.get("kind") == "eval"]
        drawn[ax_loss] |= plot(ax_loss, train, "loss", named(label, "train"), color=color)
        drawn[ax_loss] |= plot(ax_loss, evals, "loss", named(label, "eval"), color=color, marker="o", linestyle="none")
        drawn[ax_lr] |= plot(ax_lr, train, "lr", label or "lr", color=color)
        drawn[ax_eval] |= plot(ax_eval, evals, "perplexity", named(label, "perplexity"), color=color, marker="o")
        if column(evals, "accuracy")[0]:
            ax_acc = ax_acc or ax_eval.twinx()  # accuracy is 0..1, perplexity is not: a second scale
            drawn[ax_eval] |= plot(ax_acc, evals, "accuracy", named(label, "accuracy"), color=color, marker="s", linestyle="--")
        drawn[ax_tps] |= plot(ax_tps, train, "tokens_per_s", named(label, "tokens/s"), color=color)
        drawn[ax_tps] |= plot(ax_tps, train, "trained_tokens_per_s", named(label, "trained tokens/s"), color=color, linestyle=":")
        harness = [r for r in rows if r.get("kind") == HARNESS]
        for j, key in enumerate(benchmarks):
            drawn[ax_harness] |= plot(ax_harness, harness, key, named(label, short(key)), color=color, marker="o",
                                      linestyle=HARNESS_STYLES[j % len(HARNESS_STYLES)])
    titles = {ax_loss: "loss", ax_lr: "learning rate", ax_eval: "eval", ax_tps: "throughput",
              ax_harness: "benchmark evals (eval.harness)"}
    ylabels = {ax_loss: "loss", ax_lr: "lr", ax_eval: "perplexity", ax_tps: "tokens/s", ax_harness: "score"}
    for ax, has_data in drawn.items():
        ax.set_title(titles[ax])
        if ax in (ax_eval, ax_tps, ax_harness):
            ax.set_xlabel("step")
        ax.set_ylabel(ylabels[ax])
        ax.grid(alpha=0.3)
        if not has_data:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
    if column([r for _, rows in series for r in rows if r.get("kind") == "eval"], "perplexity")[0]:
        ax_eval.set_yscale("log")
    if ax_acc is not None:
        ax_acc.set_ylabel("accuracy")
        ax_acc.set_ylim(0, 1)
    fig.suptitle(title)
    fig.tight_layout()
    if len(series) > 1:
        from matplotlib.lines import Line2D

        runs = [Line2D([], [], color=f"C{i % 10}", label=label) for i, (label, _) in enumerate(series)]
        styles = [Line2D([], [], color="gray", label="train / lr / tokens/s"),
                  Line2D([], [], color="gray", marker="o", linestyle="none", label="eval"),
                  Line2D([], [], color="gray", linestyle=":", label="trained tokens/s"),
                  *(Line2D([], [], color="gray", marker="o", linestyle=HARNESS_STYLES[j % len(HARNESS_STYLES)], label=short(key))
                    for j, key in enumerate(benchmarks))]
        fig.legend(handles=runs + styles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small",
                   ncol=1 + len(runs) // 30)
        return fig
    for ax in (ax_loss, ax_tps, ax_harness):
        if ax is not None and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    handles = [h for a in (ax_eval, ax_acc) if a for h in zip(*a.get_legend_handles_labels())]
    if handles:
        ax_eval.legend(*zip(*handles), fontsize="small")
    return fig
