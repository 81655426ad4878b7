"""PNG plots of the MNIST-1D table: learning curves and accuracy per method, per student."""

from __future__ import annotations

from typing import List

import numpy as np


def plot(results, output: str) -> List[str]:
    """Writes ``mnist1d_curves_<student>.png`` (test accuracy per epoch, first
    seed) and ``mnist1d_methods_<student>.png`` (mean +- std per row);
    returns their paths."""
    from examples import _plots
    from examples import mnist1d_models

    plt = _plots.pyplot()
    paths = []
    save = _plots.png_saver(output, paths)

    for kind, rows in results.items():
        title = mnist1d_models.STUDENT_NAMES[kind]
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for i, (name, r) in enumerate(rows.items()):
            if r.curve:
                ax.plot(np.arange(1, len(r.curve) + 1), np.asarray(r.curve) * 100, label=name, linewidth=1,
                        color=plt.cm.tab20(i % 20), linestyle="--" if name.startswith("scratch") else "-")
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy % (first seed)")
        ax.set_title(f"MNIST-1D learning curves: {title}")
        ax.legend(fontsize=6, ncol=2, loc="lower right")
        save(fig, f"mnist1d_curves_{kind}.png")

        names = list(rows)
        means = [rows[n].mean for n in names]
        stds = [rows[n].std for n in names]
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(names) + 1.5))
        y = np.arange(len(names))
        ax.barh(y, means, xerr=stds, color=["tab:gray" if n.startswith(("scratch", "teacher")) else "tab:blue"
                                            for n in names])
        if "scratch" in rows:
            ax.axvline(rows["scratch"].mean, color="black", linestyle="--", linewidth=0.8, label="scratch")
            ax.legend(fontsize=7)
        ax.set_yticks(y, names, fontsize=7)
        ax.invert_yaxis()
        low = min(means) if means else 0.0
        ax.set_xlim(max(0.0, low - 10.0), 100.0)
        ax.set_xlabel("test accuracy % (mean +- std over seeds, last epoch)")
        ax.set_title(f"MNIST-1D accuracy per method: {title}")
        save(fig, f"mnist1d_methods_{kind}.png")
    return paths
