"""Figures for the trust checks: sanity (model randomization), faithfulness, shortcut report.

Pure drawing from the result objects of `cnnviz.trust.sanity`, `cnnviz.trust.faithfulness` and
`cnnviz.trust.shortcut`: no gradients, no files, no pyplot. Maps are drawn as |map| scaled per panel
(magma, 0 to the panel's max), as in Adebayo et al.'s figures, so each panel shows its own
ranking; an all-zero or constant map is drawn flat and labelled.
"""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure

from cnnviz.errors import CnnvizError
from cnnviz.plot.display import finite, is_constant, new_figure, note, plain_axes, show_image

TILE_INCHES = 1.3
_FLAG_COLOR = "tab:red"


def _show_map(ax, values, *, title: str | None = None) -> None:
    """|values| scaled to [0, 1] by its own max (an all-zero map stays 0), magma."""
    magnitude = np.abs(finite(values))
    peak = float(magnitude.max()) if magnitude.size else 0.0
    ax.imshow(magnitude / peak if peak > 0 else magnitude, cmap="magma", vmin=0.0, vmax=1.0,
              interpolation="nearest")
    plain_axes(ax)
    if is_constant(magnitude):
        note(ax, "constant")
    if title is not None:
        ax.set_title(title, fontsize=8)


# ------------------------------------------------------------------------------------ sanity
def sanity_maps_figure(result, *, image_index: int = 0, title: str | None = None) -> Figure:
    """The classic cascading-randomization grid for one image.

    Rows: methods (flagged ones in red, with the layers they are insensitive to). Columns: the
    input, the trained model's map, then the map after each randomization step (output layer
    first, cumulative left to right); a step whose map is still similar (mean rank correlation
    or SSIM above the threshold) is framed in red.

    Args:
        result: a `cnnviz.trust.sanity.SanityResult`.
        image_index: which of the kept images (0 .. len(result.images) - 1).
        title: figure title; default names the test.

    Returns:
        A Figure with len(methods) rows and 2 + len(steps) columns.
    """
    kept = len(result.images)
    if not 0 <= image_index < kept:
        raise CnnvizError(
            f"image_index {image_index} is out of range; the result kept {kept} image(s) "
            f"(0..{kept - 1})"
        )
    columns = ["input", "trained"] + [f"+ {step}" for step in result.steps]
    rows = len(result.methods)
    fig = new_figure(TILE_INCHES * len(columns) + 0.8, TILE_INCHES * rows + 0.7)
    axes = fig.subplots(rows, len(columns), squeeze=False)
    for row, method in enumerate(result.methods):
        show_image(axes[row, 0], result.images[image_index])
        maps = result.maps[method][:, image_index]  # (S + 1, H, W)
        for column, values in enumerate(maps, start=1):
            _show_map(axes[row, column], values, title=columns[column] if row == 0 else None)
            if column >= 2 and result.similar[method][column - 2]:
                _frame(axes[row, column])
        layers = result.insensitive_to[method]
        axes[row, 0].set_ylabel(
            method + ("\ninsensitive to\n" + _wrapped(", ".join(layers), 18) if layers else ""),
            fontsize=7 if layers else 8, color=_FLAG_COLOR if layers else "black",
        )
    axes[0, 0].set_title("input", fontsize=8)
    fig.suptitle(
        title or "Cascading randomization (Adebayo et al. 2018): layers re-initialized from the "
        f"output down, left to right;\nred frame: map still similar (rank correlation or SSIM "
        f"> {result.threshold:g})", fontsize=9,
    )
    return fig


def _frame(ax) -> None:
    for spine in ax.spines.values():
        spine.set_visible(True)
        spine.set_color(_FLAG_COLOR)
        spine.set_linewidth(2.5)


def sanity_curves_figure(result, *, title: str | None = None) -> Figure:
    """Rank correlation and SSIM with the trained model's map, per method, vs randomization step.

    Step 0 ("trained") is 1 by definition; the dotted line is the threshold, and a red ring
    marks each step where the method's map is still similar (either measure above it).

    Args:
        result: a `cnnviz.trust.sanity.SanityResult`.
        title: figure title.

    Returns:
        A Figure with two panels.
    """
    fig = new_figure(12.5, 4.0)
    axes = fig.subplots(1, 2)
    labels = ["trained"] + list(result.steps)
    positions = np.arange(len(labels))
    colours = method_colours(result.methods)
    for ax, (name, values) in zip(
        axes, (("Spearman rank correlation", result.rank_correlation), ("SSIM", result.ssim))
    ):
        for method in result.methods:
            curve = np.concatenate([[1.0], finite(values[method])])
            flagged = bool(result.insensitive_to[method])
            ax.plot(positions, curve, marker="o", markersize=3, color=colours[method],
                    linestyle="--" if flagged else "-",
                    label=method + (f" (insensitive to {len(result.insensitive_to[method])} of "
                                    f"{len(result.steps)})" if flagged else ""))
            similar = np.flatnonzero(result.similar[method]) + 1
            ax.plot(positions[similar], curve[similar], linestyle="none", marker="o",
                    markersize=8, markerfacecolor="none", markeredgecolor=_FLAG_COLOR)
        ax.set_xticks(positions, labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(name)
        ax.set_ylim(-0.2, 1.05)
        ax.axhline(0.0, color="gray", linewidth=0.5)
        ax.grid(alpha=0.3)
    for ax in axes:
        ax.axhline(result.threshold, color=_FLAG_COLOR, linestyle=":", linewidth=1,
                   label=f"threshold {result.threshold:g}")
    axes[0].set_xlabel("randomized down to layer")
    axes[1].set_xlabel("randomized down to layer")
    fig.legend(*axes[0].get_legend_handles_labels(), fontsize=7, loc="outside right center")
    fig.suptitle(title or "Similarity to the trained model's maps as layers are randomized "
                 "(red ring: still similar, dashed: insensitive to some layer)", fontsize=10)
    return fig


def method_colours(methods) -> dict:
    """One distinct colour per method (tab10 up to 10 methods, then tab20): 16 registry
    methods must not share the default cycle's 10 colours."""
    from matplotlib import colormaps

    palette = colormaps["tab10" if len(methods) <= 10 else "tab20"].colors
    return {method: palette[index % len(palette)] for index, method in enumerate(methods)}


# ------------------------------------------------------------------------------ faithfulness
def faithfulness_figure(result, *, title: str | None = None) -> Figure:
    """Mean deletion and insertion curves per method, the random order dashed in black.

    Args:
        result: a `cnnviz.trust.faithfulness.FaithfulnessResult`.
        title: figure title.

    Returns:
        A Figure with two panels (deletion, insertion); AUCs in the legends.
    """
    fig = new_figure(11.0, 4.0 + 0.13 * len(result.methods))
    axes = fig.subplots(1, 2)
    fractions = finite(result.fractions)
    colours = method_colours([method for method in result.methods if method != "random"])
    for ax, curve, areas, better in (
        (axes[0], result.deletion, result.deletion_auc, "lower"),
        (axes[1], result.insertion, result.insertion_auc, "higher"),
    ):
        for method in result.methods:
            if method == "random":
                ax.plot(fractions, finite(curve[method]), color="black", linestyle="--",
                        linewidth=1.5, label=f"random ({areas[method]:.3f})")
            else:
                ax.plot(fractions, finite(curve[method]), linewidth=1.2, color=colours[method],
                        label=f"{method} ({areas[method]:.3f})")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlim(0.0, 1.0)
        ax.grid(alpha=0.3)
        ax.set_ylabel("target probability")
        # Below the panel: with a dozen methods a legend inside would hide the curves.
        ax.legend(fontsize=7, title=f"AUC ({better} is better)", title_fontsize=7,
                  loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3)
    axes[0].set_xlabel(f"share of pixels replaced by {result.baseline}, most important first")
    axes[1].set_xlabel(f"share of pixels restored onto {result.baseline}, most important first")
    axes[0].set_title("Deletion", fontsize=9)
    axes[1].set_title("Insertion", fontsize=9)
    fig.suptitle(
        title or f"Faithfulness (Petsiuk et al. 2018), mean over {len(result.targets)} images",
        fontsize=10,
    )
    return fig


# ---------------------------------------------------------------------------------- shortcut
def shortcut_figure(result, *, title: str | None = None) -> Figure:
    """Training images with the cue outlined in cyan, next to each method's map (also outlined).

    Args:
        result: a `cnnviz.trust.shortcut.ShortcutResult` (its kept images and maps).
        title: figure title; default is the verdict.

    Returns:
        A Figure with one row per kept image and 1 + len(methods) columns.
    """
    methods = list(result.maps)
    rows = len(result.images)
    if rows == 0:
        raise CnnvizError("the shortcut result kept no images to draw (keep=0)")
    fig = new_figure(TILE_INCHES * (1 + len(methods)) + 0.4, TILE_INCHES * rows + 1.0)
    axes = fig.subplots(rows, 1 + len(methods), squeeze=False)
    for row in range(rows):
        mask = np.asarray(result.cue_masks[row], float)
        label = _name(result.labels[row], result.class_names)
        guess = _name(result.predicted[row], result.class_names)
        show_image(axes[row, 0], result.images[row],
                   title=f"{label} -> {guess}" if row == 0 else None)
        axes[row, 0].set_ylabel(f"{label} -> {guess}", fontsize=8)
        for column, method in enumerate(methods, start=1):
            values = np.maximum(finite(result.maps[method][row]), 0.0)  # positive part
            _show_map(axes[row, column], values, title=method if row == 0 else None)
        for ax in axes[row]:
            if mask.any():
                ax.contour(mask, levels=[0.5], colors="cyan", linewidths=0.8)
    axes[0, 0].set_title("input (label -> predicted)", fontsize=8)
    fig.suptitle(title or _wrapped(result.verdict), fontsize=8)
    return fig


def _name(label, class_names) -> str:
    index = int(label)
    return str(class_names[index]) if 0 <= index < len(class_names) else str(index)


def _wrapped(text: str, width: int = 110) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))
