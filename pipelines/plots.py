"""Plots people compare, as PNG bytes for MLflow artifacts and files (matplotlib, no display)."""

from __future__ import annotations


def figure(width: float = 6, height: float = 4, ncols: int = 1):
    """A matplotlib figure and its axes (one, or an array of `ncols`) on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(1, ncols, figsize=(width, height))


def png(fig, ax) -> bytes:
    """Grid (on `ax`, or each of an array of axes), tight layout, PNG bytes at 120 dpi; the figure is closed."""
    import io

    import matplotlib.pyplot as plt
    import numpy as np

    for each in np.atleast_1d(ax):
        each.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()
