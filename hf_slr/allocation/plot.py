"""A PNG of an allocation report: sparsity per layer, rank ratio per matrix type, outer-loop loss with
the uniform, OWL and learned allocations' losses on the same batch as horizontal lines."""

from __future__ import annotations

import os
from collections import defaultdict


def plot_allocation(report: dict, path: str | os.PathLike) -> None:
    """Write ``report`` (``model.slr_report["allocation"]``) as a three-panel PNG (matplotlib, Agg).

    Rank ratios are averaged over layers per matrix type (the last component of the module
    name: q_proj, k_proj, ..., down_proj).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    by_type = defaultdict(list)
    for name, entry in report["modules"].items():
        by_type[name.rsplit(".", 1)[-1]].append(entry["rank_ratio"])
    types, ratios = list(by_type), list(by_type.values())
    figure = Figure(figsize=(15, 4), layout="constrained")
    FigureCanvasAgg(figure)
    sparsity_axes, rank_axes, loss_axes = figure.subplots(1, 3)

    layers = range(len(report["layer_sparsity"]))
    sparsity_axes.plot(layers, report["layer_sparsity"], marker="o", color="tab:blue")
    sparsity_axes.axhline(report["compression_ratio"], color="black", linestyle="--", label="target (mean)")
    sparsity_axes.set(
        xlabel="decoder layer", ylabel="layer compression ratio s_l", title=f"{report['allocation']}: sparsity per layer"
    )
    sparsity_axes.legend()

    means = [sum(values) / len(values) for values in ratios]
    spans = [[mean - min(values) for mean, values in zip(means, ratios)]]
    spans.append([max(values) - mean for mean, values in zip(means, ratios)])
    rank_axes.errorbar(types, means, yerr=spans, fmt="o", color="tab:orange", capsize=4)
    rank_axes.set(ylabel="rank ratio kappa (mean, min-max over layers)", title="rank ratio per matrix type")
    rank_axes.tick_params(axis="x", labelrotation=30)

    curve = report["loss_curve"]
    if curve:
        loss_axes.plot(range(1, len(curve) + 1), curve, marker="o", markersize=3, label="samples (mean per step)")
        styles = {"uniform": "tab:gray", "owl": "tab:green", "learned": "tab:red"}
        for label, value in report.get("reference_losses", {}).items():
            loss_axes.axhline(value, color=styles.get(label, "black"), linestyle="--", label=f"{label}: {value:.4f}")
        loss_axes.set(xlabel="outer step", ylabel="calibration LM loss on the step's batch")
        loss_axes.legend()
    else:
        loss_axes.text(0.5, 0.5, "no outer loop", ha="center", va="center", transform=loss_axes.transAxes)
    loss_axes.set(title=f"outer loop ({report['seconds']:.0f} s)")
    figure.savefig(path, dpi=100)
