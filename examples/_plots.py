"""What the examples' plotting functions share: a headless pyplot and a PNG saver."""

from __future__ import annotations

import os
from typing import Callable, List


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_saver(output: str, paths: List[str]) -> Callable:
    """``save(fig, name)``: writes ``fig`` to ``output/name`` (tight layout, 100 dpi),
    closes it and appends the path to ``paths``."""
    plt = pyplot()

    def save(fig, name):
        path = os.path.join(output, name)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)

    return save
