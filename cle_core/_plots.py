"""Pictures of what equalization did, drawn from a :class:`~cle_core.Report`.

matplotlib is an optional extra (``pip install 'crosslayer-eq[plot]'``); it is imported
only when a plot is drawn, with the Agg backend (no display needed).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ._files import write_atomic
from ._report import LayerRecord, Report

__all__ = ["write_plots", "plot_channel_ranges", "plot_sqnr"]


def _pyplot():
    try:
        import matplotlib
    except ModuleNotFoundError:
        raise ImportError(
            "plots need matplotlib: pip install matplotlib (or 'crosslayer-eq[plot]')"
        ) from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _spread(values: np.ndarray) -> float:
    """Largest channel range over the 10th percentile: how badly one grid fits most
    channels (a percentile, so that a few dead channels do not decide it)."""
    live = values[values > 0]
    return float(live.max() / np.percentile(live, 10)) if live.size else 1.0


def worst_layers(report: Report, count: int) -> list[LayerRecord]:
    """The equalized layers whose channel ranges were most unequal before CLE."""
    changed = [r for r in report.layers if not np.array_equal(r.ranges_before, r.ranges_after)]
    return sorted(changed, key=lambda r: _spread(r.ranges_before), reverse=True)[:count]


def plot_channel_ranges(report: Report, path: str | Path, worst: int = 8) -> Path | None:
    """Per-output-channel weight ranges before and after CLE for the ``worst`` layers
    (largest range spread before), one panel each, log scale. None if nothing changed."""
    layers = worst_layers(report, worst)
    if not layers:
        return None
    plt = _pyplot()
    cols = 2 if len(layers) > 1 else 1
    rows = math.ceil(len(layers) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 2.8 * rows), squeeze=False)
    for ax, rec in zip(axes.flat, layers, strict=False):
        x = np.arange(rec.ranges_before.size)
        if x.size <= 64:
            ax.bar(x - 0.2, rec.ranges_before, width=0.4, color="#b0b0b0", label="before CLE")
            ax.bar(x + 0.2, rec.ranges_after, width=0.4, color="#1f77b4", label="after CLE")
        else:  # too many channels for bars: one dot per channel
            ax.plot(x, rec.ranges_before, ".", color="#a0a0a0", ms=3, label="before CLE")
            ax.plot(x, rec.ranges_after, ".", color="#1f77b4", ms=3, label="after CLE")
        ax.set_yscale("log")
        _few_log_ticks(ax, np.concatenate([rec.ranges_before, rec.ranges_after]))
        ax.set_title(
            f"{_shorten(rec.name, 60)}\nmax/p10 range {_spread(rec.ranges_before):.0f}x -> "
            f"{_spread(rec.ranges_after):.1f}x, est. INT8 SQNR "
            f"{rec.sqnr_before:.1f} -> {rec.sqnr_after:.1f} dB",
            fontsize=9,
        )
        ax.set_xlabel("output channel")
        ax.set_ylabel("max |weight|")
        ax.set_xlim(-0.5, x.size - 0.5)
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    axes.flat[0].legend(loc="upper right", fontsize=8)
    fig.suptitle("Per-channel weight ranges before and after cross-layer equalization")
    fig.tight_layout()
    return _save(fig, path)


def plot_sqnr(report: Report, path: str | Path) -> Path | None:
    """Estimated per-tensor INT8 weight SQNR of every layer, before and after."""
    layers = [
        r for r in report.layers if math.isfinite(r.sqnr_before) and math.isfinite(r.sqnr_after)
    ]
    if not layers:
        return None
    plt = _pyplot()
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(7, 0.22 * len(layers) + 2), 4))
    before = [r.sqnr_before for r in layers]
    after = [r.sqnr_after for r in layers]
    ax.plot(x, before, "o-", color="#b0b0b0", label=f"before CLE (mean {np.mean(before):.1f} dB)")
    ax.plot(x, after, "o-", color="#1f77b4", label=f"after CLE (mean {np.mean(after):.1f} dB)")
    ax.set_xlabel("layer (graph order)")
    ax.set_ylabel("estimated INT8 weight SQNR (dB)")
    ax.set_title("Per-tensor INT8 weight quantization, estimated per layer")
    ax.grid(alpha=0.3)
    ax.legend()
    if len(layers) <= 60:
        ax.set_xticks(x)
        ax.set_xticklabels([_shorten(r.name, 32) for r in layers], rotation=90, fontsize=6)
    fig.tight_layout()  # makes room below the axis for the longest label
    return _save(fig, path)


def _shorten(name: str, width: int) -> str:
    """``name`` in at most ``width`` characters, cut in the middle: exporters' names
    share their beginnings (``/backbone/features.``) and differ at both ends."""
    if len(name) <= width:
        return name
    head = (width - 1) // 3
    return f"{name[:head]}\u2026{name[len(name) - (width - 1 - head) :]}"


def _few_log_ticks(ax, values: np.ndarray) -> None:
    """At most five labelled powers of ten on a log axis, no labelled minor ticks:
    matplotlib labels the minor ticks of a range under a decade or two, and they
    overlap in a panel 2.8 inches high. The axis spans whole decades, so that at least
    two powers of ten are labelled."""
    from matplotlib.ticker import LogLocator, NullFormatter

    live = values[values > 0]
    if live.size:
        low, high = np.floor(np.log10(live.min())), np.ceil(np.log10(live.max()))
        ax.set_ylim(10.0**low, 10.0 ** max(high, low + 1))
    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=5))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.tick_params(axis="y", labelsize=8)


def _save(fig, path) -> Path:
    """Save a figure as PNG atomically (a temporary file, then a rename)."""
    import matplotlib.pyplot as plt

    try:
        return write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)


def write_plots(report: Report, directory: str | Path, worst: int = 8) -> list[Path]:
    """Write ``channel_ranges.png`` and ``sqnr_per_layer.png`` into ``directory``
    (created if missing; its parent must exist, as the folder of an output file must).
    Returns the files written: none, and no folder left behind, when there is nothing
    to draw (no layer was translated)."""
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(exist_ok=True)
    written = [
        plot_channel_ranges(report, directory / "channel_ranges.png", worst),
        plot_sqnr(report, directory / "sqnr_per_layer.png"),
    ]
    written = [p for p in written if p is not None]
    if created and not written:
        directory.rmdir()
    return written
