"""Markdown tables of a candidate beside its base, shared by the benchmark's tables and the model card."""

from __future__ import annotations


def beside_base(metrics: dict[str, float], first: str, rows: list[tuple[str, str]], shown: list[tuple[str, str]],
                column_suffix: str = " (base)", missing: str = "-") -> list[str]:
    """One row per (label, metric-name pattern with `{}` for the column's name), columns `shown` as
    (name, format): `value (base value)`, the base's where `<name>_base` exists; `missing` where the
    candidate has no such metric."""
    lines = [f"| {first} | " + " | ".join(f"{n}{column_suffix}" for n, _ in shown) + " |", "|---" * (len(shown) + 1) + "|"]
    for label, pattern in rows:
        cells = []
        for name, fmt in shown:
            key = pattern.format(name)
            base = metrics.get(f"{key}_base")
            cell = fmt.format(metrics[key]) if key in metrics else missing
            cells.append(cell + (f" ({fmt.format(base)})" if base is not None else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines
