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
    """Null dimension of the stacked operator against the number of prompts N, one line per layer: in absolute
    KL units (top row, when the result has them: the fisher observable) and relative to sigma_max."""
    layers = result["layers"]
    rows = [("kl_null_dim", "KL-invisible dimension", "tau = {} nats")] if "kl_null_dim" in layers[0]["stacked"][0] \
        else []
    rows.append(("null_dim", "null dimension", "eps = {} (relative to sigma_max)"))
    keys = {field: list(layers[0]["stacked"][0][field])[:3] for field, _, _ in rows}
    width = max(len(k) for k in keys.values())
    fig, axes = plt.subplots(len(rows), width, figsize=(4.2 * width, 4 * len(rows)), squeeze=False)
    for ax_row, (field, ylabel, title) in zip(axes, rows):
        for ax, key in zip(ax_row, keys[field]):
            for color, entry in zip(_layer_colors(len(layers)), layers):
                pts = [(s["n_prompts"], s[field][key]) for s in entry["stacked"] if s[field][key] is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", color=color, label=f"layer {entry['layer']}")
            ax.set(xscale="log", xlabel="number of stacked prompts N", ylabel=ylabel, title=title.format(key))
        if ax_row[0].get_legend_handles_labels()[0]:
            ax_row[0].legend(fontsize=7)
    steer = layers[0].get("steer")
    note = f"; KL of a steer of norm {steer['fraction_of_median_h_norm']:g} x median ||h_l||, mean over prompts" \
        if steer else ""
    fig.suptitle(f"Null dimension of the stacked Jacobian [J_1; ...; J_N] ({result['observable']}){note}")
    save_figure(fig, path)


def plot_identifiability(result: dict, path: Path) -> None:
    """Held-out KL ratio (tau-invisible subspace of N training prompts / random direction) against N, one panel
    per tau, one line per layer (mean over splits, band: min to max; dashed: the exact-KL ratio)."""
    summary = result["summary"]
    taus = sorted({r["tau"] for r in summary}, reverse=True)
    layers = sorted({r["layer"] for r in summary})
    fig, axes = plt.subplots(1, len(taus), figsize=(4.6 * len(taus), 4.2), squeeze=False)
    for ax, tau in zip(axes[0], taus):
        for color, layer in zip(_layer_colors(len(layers)), layers):
            rows = [r for r in summary if r["layer"] == layer and r["tau"] == tau and r["ratio_mean"] is not None]
            if not rows:
                continue
            ns = [r["n_train"] for r in rows]
            ax.plot(ns, [r["ratio_mean"] for r in rows], marker="o", color=color, label=f"layer {layer}")
            ax.fill_between(ns, [r["ratio_min"] for r in rows], [r["ratio_max"] for r in rows], color=color,
                            alpha=0.15)
            exact = [(r["n_train"], r["exact_ratio_mean"]) for r in rows if r["exact_ratio_mean"] is not None]
            if exact:
                ax.plot(*zip(*exact), ls="--", color=color, alpha=0.8)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.axhline(0.5, color="grey", ls=":", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="training prompts N", title=f"tau = {tau:g} nats",
               ylabel="held-out KL: invisible / random direction")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    s = result["settings"]
    fig.suptitle(f"{result['model_name']}: do invisible directions stay invisible on new prompts? "
                 f"(steer {s['steer_fraction']:g} x median ||h_l||; dashed: exact KL)", fontsize=9)
    save_figure(fig, path)


def plot_first_order(result: dict, path: Path) -> None:
    """Exact KL / second-order KL against steer size (fraction of the median ||h_l||), one panel per layer, one
    line per direction family; the +-10% band, and where the trait's v and v + v_perp steer at the studies' alpha."""
    layers = result["layers"]
    trait = result["settings"]["trait"]
    fig, axes = plt.subplots(1, len(layers), figsize=(4.6 * len(layers), 4.2), squeeze=False)
    for ax, entry in zip(axes[0], layers):
        sweep = entry["sweep"]
        for color, (name, fam) in zip(plt.cm.tab10(np.arange(4)), sweep["families"].items()):
            if fam is not None:
                ax.plot(sweep["fractions"], fam["ratio"], marker="o", ms=3, color=color,
                        label=f"{name} ({fam['directions']})")
        ax.axhspan(0.9, 1.1, color="grey", alpha=0.15, lw=0)
        ax.axhline(1.0, color="grey", lw=0.8)
        position = entry["positions"]["traits"][trait]
        for key, ls in (("v_fraction_pool", "--"), ("v+perp_fraction_pool", ":")):
            ax.axvline(position[key], color="black", ls=ls, lw=0.9,
                       label=f"{trait} {key.split('_')[0]} at alpha = {result['settings']['alpha']:g}")
        ax.set(xscale="log", xlabel="steer size s / median ||h_l||", ylabel="exact KL / second-order KL",
               title=f"layer {entry['layer']}")
        ax.legend(fontsize=7)
    fig.suptitle(f"{result['model_name']}: where the second-order KL holds (band: +-10%)", fontsize=9)
    save_figure(fig, path)


def plot_invisible_steering(result: dict, path: Path) -> None:
    """KL per token against v and the probe score minus v's, against the rotation angle theta, one line per
    direction family (mean over its directions; bars: the 95% interval over prompts of each direction); hollow
    markers at 45 degrees: v + ||v|| u (norm sqrt(2) ||v||, the paper's v + v_perp)."""
    rows = result["summary"]
    families = [f for f in ("null", "random", "visible") if any(r["family"] == f for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    for ax, key, label in ((axes[0], "kl_per_token", "KL(p_v || p) per token (nats)"),
                           (axes[1], "score_minus_v", f"{result['settings']['trait']} score - score(v)")):
        for color, family in zip(plt.cm.tab10(np.arange(len(families))), families):
            rot = [r for r in rows if r["family"] == family and r["theta"] is not None and r[key] is not None]
            thetas = sorted({r["theta"] for r in rot})
            means = [np.mean([r[key]["mean"] for r in rot if r["theta"] == t]) for t in thetas]
            ax.plot([0.0, *thetas], [0.0, *means], marker="o", color=color, label=family)   # theta = 0 is v
            for r in rot:
                ax.plot([r["theta"]] * 2, [r[key]["ci_low"], r[key]["ci_high"]], color=color, alpha=0.4, lw=1)
            plus = [r for r in rows if r["family"] == family and r["theta"] is None and r[key] is not None]
            ax.scatter([45.0] * len(plus), [r[key]["mean"] for r in plus], facecolors="none", edgecolors=color)
        base = next(r for r in rows if r["condition"] == "base")[key]
        if base is not None:
            ax.axhline(base["mean"], color="black", ls="--", lw=0.9, label="unsteered (base)")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set(xlabel="rotation angle theta (degrees) away from v", ylabel=label)
        ax.legend(fontsize=7)
    s = result["settings"]
    fig.suptitle(f"{result['model_name']}: steering v rotated toward invisible, random and visible directions "
                 f"(layer {s['layer']}, alpha = {s['alpha']:g}; hollow: v + ||v|| u)", fontsize=9)
    save_figure(fig, path)


def plot_layer_profile(rows: list[dict], path: Path, title: str = "") -> None:
    """`strength.layer_profile` rows against layer: ||v|| / median ||h_l||, the KL per unit alpha^2, the alpha of the
    target KL, and the share of ||v||^2 in the prompts' invisible subspace."""
    xs = [r["layer"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharex=True)
    panels = [("norm_ratio", "||v|| / median ||h_l||", "linear"),
              ("kl_per_alpha_sq", "second-order KL per alpha^2 (nats)", "log"),
              ("alpha", f"alpha for KL = {rows[0]['target_kl']:g} nats (exact)", "log"),
              ("invisible_share", "share of ||v||^2 in the invisible subspace", "linear")]
    for ax, (key, label, scale) in zip(axes.flat, panels):
        ax.plot(xs, [r[key] for r in rows], marker="o")
        if key == "alpha":
            ax.plot(xs, [r["second_order_alpha"] for r in rows], marker="x", ls="--", label="second order")
            ax.legend(fontsize=7)
        ax.set(ylabel=label, yscale=scale)
    for ax in axes[1]:
        ax.set_xlabel("layer l")
    fig.suptitle(title or "Layer profile of a steering vector")
    save_figure(fig, path)
