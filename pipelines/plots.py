"""Plots people compare, as PNG bytes for MLflow artifacts and files (matplotlib, no display)."""

from __future__ import annotations


def figure(width: float = 6, height: float = 4):
    """A matplotlib figure and axes on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def png(fig, ax) -> bytes:
    """Grid, tight layout, PNG bytes at 120 dpi; the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    ax.grid(alpha=0.3)
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return buffer.getvalue()
