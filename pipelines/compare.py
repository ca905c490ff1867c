"""`llmopt compare`: the latest finished run of each recipe side by side (quality, latency, memory,
cost, size, from the metric names every run logs) and a Pareto plot of quality against latency."""

from __future__ import annotations

import statistics
from pathlib import Path

COLUMNS = [  # (header, how to get it from a run's metrics, format)
    ("ppl Δ%", lambda m: m.get("quality/ppl_delta_pct"), "{:+.2f}"),
    ("task recovery", lambda m: quality_score(m), "{:.4f}"),
    ("TPOT ms (bs min)", lambda m: _at_batch(m, "tpot_ms", min), "{:.2f}"),
    ("TTFT ms (bs min)", lambda m: _at_batch(m, "ttft_ms", min), "{:.1f}"),
    ("out tok/s (bs max)", lambda m: _at_batch(m, "output_tok_s", max), "{:.1f}"),
    ("$/1M out (bs max)", lambda m: _at_batch(m, "usd_per_1m_output_tokens", max), "{:.3f}"),
    ("out tok/s at SLA (server)", lambda m: m.get("serve/tok_s_at_sla"), "{:.1f}"),
    ("$/1M out at SLA", lambda m: m.get("serve/usd_per_1m_output_tokens_at_sla"), "{:.3f}"),
    ("peak GPU GB", lambda m: m.get("memory/peak_gpu_gb"), "{:.2f}"),
    ("weights GB", lambda m: m.get("memory/weights_gb"), "{:.4f}"),
    ("gates", lambda m: m.get("gates/passed"), "{:.0f}"),
]


def _batches(metrics: dict[str, float], name: str) -> dict[int, float]:
    prefix = f"bench/{name}/bs"
    return {int(k.removeprefix(prefix)): v for k, v in metrics.items()
            if k.startswith(prefix) and k.removeprefix(prefix).isdigit()}


def _at_batch(metrics: dict[str, float], name: str, pick) -> float | None:
    values = _batches(metrics, name)
    return values[pick(values)] if values else None


def quality_score(metrics: dict[str, float]) -> float | None:
    """Mean recovery over the lm-eval metrics (1 = the base's quality), else perplexity's
    (base / candidate), else None."""
    recoveries = [v for k, v in metrics.items() if k.startswith("quality/") and k.endswith("_recovery")]
    if recoveries:
        return statistics.mean(recoveries)
    if "quality/ppl" in metrics and "quality/ppl_base" in metrics:
        return metrics["quality/ppl_base"] / metrics["quality/ppl"]
    return None


def latest_runs(tracker, recipes: list[str]) -> list:
    """The newest finished top-level run of each recipe (experiment), in the order asked."""
    client = tracker.client
    if recipes:
        experiments = []
        for name in recipes:
            found = client.get_experiment_by_name(name)
            if found is None:
                raise ValueError(f"no runs of recipe {name!r} in {tracker.uri}")
            experiments.append(found)
    else:
        experiments = [e for e in client.search_experiments() if e.name != "Default"]
    runs = []
    for experiment in experiments:
        found = client.search_runs([experiment.experiment_id],
                                   "attributes.status = 'FINISHED' and tags.`llmopt.recipe` != ''",
                                   order_by=["attributes.start_time DESC"], max_results=50)
        top = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
        if top:
            runs.append(top[0])
    if not runs:
        raise ValueError(f"no finished llmopt runs in {tracker.uri}")
    return runs


def compare(tracker, recipes: list[str], out: Path) -> tuple[str, Path]:
    runs = latest_runs(tracker, recipes)
    header = "| recipe | run | " + " | ".join(c[0] for c in COLUMNS) + " |"
    lines = [header, "|---" * (len(COLUMNS) + 2) + "|"]
    for run in runs:
        cells = []
        for _, get, fmt in COLUMNS:
            value = get(run.data.metrics)
            cells.append("" if value is None else fmt.format(value))
        lines.append(f"| {run.data.tags['llmopt.recipe']} | {run.info.run_id[:8]} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.md").write_text(table)
    plot = out / "pareto.png"
    plot.write_bytes(pareto_plot(runs))
    return table, plot


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both axes (lower latency, higher quality)."""
    front = []
    for i, (lat, q) in enumerate(points):
        dominated = any((lat2 <= lat and q2 >= q) and (lat2 < lat or q2 > q) for j, (lat2, q2) in enumerate(points) if j != i)
        if not dominated:
            front.append(i)
    return front


def pareto_plot(runs: list) -> bytes:
    from llmopt.plots import figure, png

    fig, ax = figure(7, 4.5)
    placed = []
    for run in runs:
        m = run.data.metrics
        latency, quality = _at_batch(m, "tpot_ms", min), quality_score(m)
        if latency is None or quality is None:
            continue
        placed.append((run.data.tags["llmopt.recipe"], latency, quality, m.get("memory/weights_gb") or 0.0))
    if placed:
        biggest = max(p[3] for p in placed) or 1.0
        sizes = [40 + 400 * p[3] / biggest for p in placed]
        ax.scatter([p[1] for p in placed], [p[2] for p in placed], s=sizes, alpha=0.6)
        front = sorted(pareto_front([(p[1], p[2]) for p in placed]), key=lambda i: placed[i][1])
        ax.plot([placed[i][1] for i in front], [placed[i][2] for i in front], "--", color="gray", label="Pareto front")
        for name, latency, quality, _ in placed:
            ax.annotate(name, (latency, quality), fontsize=8, xytext=(4, 4), textcoords="offset points")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no run has both a quality and a latency figure", ha="center", transform=ax.transAxes)
    ax.set_xlabel("TPOT ms at the smallest batch (lower is better)")
    ax.set_ylabel("quality: mean recovery vs base (higher is better)")
    ax.set_title("quality vs latency (marker size: weights GB)")
    return png(fig, ax)
