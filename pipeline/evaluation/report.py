"""Plots (matplotlib, Agg) and the self-contained HTML report of ``pipeline.eval``.

Every ``plot_*`` function writes one PNG and returns its path; :func:`write_html` embeds the PNGs
(base64) next to tables and the coloured-token text, so the report is one file to open or mail.
"""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
from matplotlib import colors as mcolors  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402


def expert_colours(num_experts: int) -> list[str]:
    """One distinct hex colour per expert (tab10 up to 10 experts, tab20 up to 20, then hsv)."""
    if num_experts <= 10:
        cmap = plt.get_cmap("tab10")
    elif num_experts <= 20:
        cmap = plt.get_cmap("tab20")
    else:
        cmap = plt.get_cmap("hsv", num_experts)
    return [mcolors.to_hex(cmap(i)) for i in range(num_experts)]


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_expert_shares(shares: dict[str, list[list[float]]], layers: Sequence[int], path: str | os.PathLike,
                       title: str = "") -> Path:
    """The paper's Figure 7: per layer, the share of routed tokens per expert, one bar per source.

    ``shares[source][layer][expert]``; the dashed line is the uniform share 1/E.
    """
    sources = list(shares)
    num_experts = len(next(iter(shares.values()))[0])
    fig, axes = plt.subplots(len(layers), 1, figsize=(max(6, num_experts * 0.9) + 2.5, 2.4 * len(layers)),
                             squeeze=False, sharex=True, layout="constrained")
    width = 0.8 / len(sources)
    for ax, layer in zip(axes[:, 0], layers, strict=True):
        for i, source in enumerate(sources):
            xs = [e - 0.4 + width * (i + 0.5) for e in range(num_experts)]
            ax.bar(xs, shares[source][layer], width=width, label=source)
        ax.axhline(1.0 / num_experts, color="grey", linestyle="--", linewidth=1)
        ax.set_ylabel("share")
        ax.set_title(f"layer {layer}", fontsize=9)
    axes[-1, 0].set_xticks(range(num_experts))
    axes[-1, 0].set_xlabel("expert")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, loc="outside right upper", title="source", title_fontsize=8)
    fig.suptitle(title or "Share of routed tokens per expert")
    return _save(fig, path)


def plot_repetition(repetition: dict[str, dict[str, list[float]]], baseline: dict[str, float],
                    path: str | os.PathLike, title: str = "") -> Path:
    """Per layer: consecutive tokens with the same first choice / overlapping top-k, vs random."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), squeeze=False)
    for ax in axes[0]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax, key, label in ((axes[0, 0], "same_first", "same first-choice expert"),
                           (axes[0, 1], "topk_overlap", "top-k sets share an expert")):
        for source, rates in repetition.items():
            style = {"linewidth": 2.2, "color": "black"} if source == "all" else {"linewidth": 1, "alpha": 0.8}
            ax.plot(range(len(rates[key])), rates[key], marker="o", markersize=3, label=source, **style)
        ax.axhline(baseline[key], color="grey", linestyle="--", label=f"random ({baseline[key]:.3f})")
        ax.set_xlabel("layer")
        ax.set_ylabel("rate")
        ax.set_ylim(0, 1)
        ax.set_title(label, fontsize=10)
    axes[0, 1].legend(fontsize=7, loc="best")
    fig.suptitle(title or "Consecutive-token expert repetition")
    return _save(fig, path)


def plot_passkey(result: dict, path: str | os.PathLike, title: str = "") -> Path:
    """Accuracy heat map: depth (rows) x context length (columns)."""
    acc = [[result["accuracy"][i][j] for i in range(len(result["lengths"]))] for j in range(len(result["depths"]))]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(result["lengths"]), 1.0 + 0.5 * len(result["depths"])))
    image = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    for j, row in enumerate(acc):
        for i, value in enumerate(row):
            ax.text(i, j, f"{value:.0%}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(result["lengths"])), [str(n) for n in result["lengths"]])
    ax.set_yticks(range(len(result["depths"])), [f"{d:.0%}" for d in result["depths"]])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("key depth")
    fig.colorbar(image, ax=ax, label="accuracy")
    ax.set_title(title or f"Passkey retrieval ({result['trials']} keys per cell)", fontsize=10)
    return _save(fig, path)


def plot_lines(series: dict[str, list[float]], path: str | os.PathLike, *, xlabel: str, ylabel: str,
               title: str) -> Path:
    """One line per series over its index (e.g. total variation per layer, one line per model pair)."""
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for name, values in series.items():
        ax.plot(range(len(values)), values, marker="o", markersize=3, label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_bars(values: dict[str, dict[str, float]], path: str | os.PathLike, *, ylabel: str, title: str,
              log_scale: bool = False) -> Path:
    """Grouped bars: ``values[group][item]`` (e.g. perplexity per model and source), each labelled
    with its value. ``log_scale``: for values orders of magnitude apart (a random base's perplexity
    of 32,000 next to a tuned model's 17), which a linear axis flattens to nothing."""
    groups = list(values)
    items = sorted({item for group in values.values() for item in group})
    width = 0.8 / len(groups)
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(items)), 3.4))
    for g, group in enumerate(groups):
        xs = [i - 0.4 + width * (g + 0.5) for i in range(len(items))]
        heights = [values[group].get(item, float("nan")) for item in items]
        bars = ax.bar(xs, heights, width=width, label=group)
        ax.bar_label(bars, labels=[_short_number(v) for v in heights], fontsize=6, padding=1)
    if log_scale:
        ax.set_yscale("log")
        # From 1 (or below the smallest bar): every bar gets a height that shows its order of magnitude.
        finite = [v for group in values.values() for v in group.values() if math.isfinite(v) and v > 0]
        ax.set_ylim(bottom=min([1.0, *(v / 2 for v in finite)]))
        ylabel += " (log scale)"
    ax.set_xticks(range(len(items)), items, rotation=20, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def _short_number(value: float) -> str:
    if not math.isfinite(value):
        return ""
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def display_token(piece: str) -> str:
    """A SentencePiece piece as it reads in text: '▁' is a space, byte pieces become symbols."""
    if piece == "<0x0A>":
        return "\u21b5"
    if piece.startswith("<0x") and piece.endswith(">"):
        return "\u00b7"
    return piece.replace("\u2581", " ")


def plot_token_experts(pieces: Sequence[str], experts_by_layer: dict[int, Sequence[int]], num_experts: int,
                       path: str | os.PathLike, title: str = "", width_chars: int = 90) -> Path:
    """The paper's Figure 8: text with each token's background coloured by its first-choice expert.

    One panel per layer; monospace layout, wrapped at ``width_chars`` characters.
    """
    palette = expert_colours(num_experts)
    words = [display_token(p) for p in pieces]
    # Wrap once (the layout is the same in every panel): (line, column) of each token.
    places, line, col = [], 0, 0
    for word in words:
        if col + len(word) > width_chars and col > 0:
            line, col = line + 1, 0
        places.append((line, col))
        col += max(len(word), 1)
    lines = line + 1
    layers = list(experts_by_layer)
    fig, axes = plt.subplots(len(layers), 1, figsize=(width_chars * 0.085, (0.22 * lines + 0.5) * len(layers) + 0.6),
                             squeeze=False, layout="constrained")
    for ax, layer in zip(axes[:, 0], layers, strict=True):
        ax.set_xlim(0, width_chars)
        ax.set_ylim(lines, -0.5)
        ax.axis("off")
        ax.set_title(f"layer {layer}: first-choice expert", fontsize=9, loc="left")
        for word, (row, column), expert in zip(words, places, experts_by_layer[layer], strict=True):
            ax.text(column, row + 0.5, word, family="monospace", fontsize=8, va="center", parse_math=False,
                    bbox={"facecolor": palette[expert], "alpha": 0.55, "pad": 0.6, "edgecolor": "none"})
    handles = [matplotlib.patches.Patch(color=palette[e], alpha=0.55, label=f"expert {e}") for e in range(num_experts)]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(num_experts, 8), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def token_experts_html(pieces: Sequence[str], experts: Sequence[int], num_experts: int) -> str:
    """The same text as HTML: one span per token, coloured by expert, the expert id on hover."""
    palette = expert_colours(num_experts)
    spans = []
    for piece, expert in zip(pieces, experts, strict=True):
        word = html.escape(display_token(piece))
        spans.append(f'<span class="tok" style="background:{palette[expert]}8c" title="expert {expert}">{word}</span>')
        if piece == "<0x0A>":
            spans.append("<br>")
    return '<div class="text">' + "".join(spans) + "</div>"


def legend_html(num_experts: int) -> str:
    palette = expert_colours(num_experts)
    return "".join(f'<span class="tok" style="background:{c}8c">expert {e}</span> ' for e, c in enumerate(palette))


def table_html(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(value) -> str:
        return f"{value:.4g}" if isinstance(value, float) else html.escape(str(value))

    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def image_html(path: str | os.PathLike, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


_STYLE = """
body { font-family: sans-serif; max-width: 1200px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: right; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.text { font-family: monospace; line-height: 1.9; white-space: pre-wrap; }
.tok { border-radius: 2px; padding: 1px 0; }
.note { color: #666; font-size: 0.9em; }
"""


def write_html(path: str | os.PathLike, title: str, sections: Sequence[tuple[str, str]]) -> Path:
    """A standalone HTML page from (heading, html body) sections, written atomically."""
    path = Path(path)
    body = "".join(f"<h2>{html.escape(heading)}</h2>\n{content}\n" for heading, content in sections)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n{body}</body></html>")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, path)
    return path
