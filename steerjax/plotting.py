"""Matplotlib figures for result files (Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def save_figure(fig, path) -> None:
    """tight_layout, write `path` at 120 dpi and close the figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _layer_colors(n: int):
    return plt.cm.viridis(np.linspace(0, 0.9, max(n, 1)))


def plot_spectra(result: dict, path: Path) -> None:
    """Median (over prompts) of sigma_i / sigma_max per layer, log scale."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    layers = result["layers"]
    for color, entry in zip(_layer_colors(len(layers)), layers):
        rel = np.array([np.asarray(p["singular_values"]) / p["sigma_max"] for p in entry["per_prompt"]])
        ax.semilogy(np.arange(1, rel.shape[1] + 1), np.maximum(np.median(rel, axis=0), 1e-18),
                    color=color, label=f"layer {entry['layer']}")
    if result.get("noise_floor"):
        ax.axhline(result["noise_floor"], color="grey", ls=":", label=f"{result['dtype']} noise floor")
    ax.set(xlabel="index i", ylabel="sigma_i / sigma_max (median over prompts)",
           title=f"Spectrum of J = d {result['observable']} / d h_l  ({result['model_name']})")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def plot_effective_ranks(result: dict, path: Path) -> None:
    """Effective ranks (median over prompts) against layer."""
    layers = result["layers"]
    xs = [e["layer"] for e in layers]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    first = layers[0]["per_prompt"][0]["effective_rank"]
    numeric_key = "numerical" if "numerical" in first else "numerical_lower_bound"
    for eps in first[numeric_key]:
        ax.plot(xs, [np.median([p["effective_rank"][numeric_key][eps] for p in e["per_prompt"]]) for e in layers],
                marker="o", label=f"numerical rank, eps {eps}")
    for name in ("entropy", "stable", "participation_ratio"):
        if name in first:
            ax.plot(xs, [np.median([p["effective_rank"][name] for p in e["per_prompt"]]) for e in layers],
                    marker="s", ls="--", label=name.replace("_", " "))
    ax.axhline(result["d"], color="grey", ls=":", label=f"d = {result['d']}")
    ax.set(xlabel="layer l", ylabel="effective rank (median over prompts)", yscale="log",
           title="Effective rank of J_l per layer")
    ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_stacked_null_dims(result: dict, path: Path) -> None:
    """Null dimension of the stacked operator against the number of prompts N, one line per layer."""
    layers = result["layers"]
    eps_keys = list(layers[0]["stacked"][0]["null_dim"])[:3]
    fig, axes = plt.subplots(1, len(eps_keys), figsize=(4.2 * len(eps_keys), 4), squeeze=False)
    for ax, eps in zip(axes[0], eps_keys):
        for color, entry in zip(_layer_colors(len(layers)), layers):
            pts = [(s["n_prompts"], s["null_dim"][eps]) for s in entry["stacked"] if s["null_dim"][eps] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", color=color, label=f"layer {entry['layer']}")
        ax.set(xscale="log", xlabel="number of stacked prompts N", ylabel="null dimension",
               title=f"eps = {eps}")
    if axes[0][0].get_legend_handles_labels()[0]:
        axes[0][0].legend(fontsize=7)
    fig.suptitle("Null dimension of the stacked Jacobian [J_1; ...; J_N]")
    save_figure(fig, path)
