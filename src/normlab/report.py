"""Plots of a run's diagnostics, and ``report.html``: one self-contained page per run.

matplotlib is imported here only, so ``import normlab`` stays light.
"""

import base64
import html
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from normlab.diagnostics import Report, Snapshot, format_table, stability_line
from normlab.files import atomic_write_bytes
from normlab.nn import ACTIVATIONS

FIGSIZE = (7.5, 3.2)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def png_bytes(fig) -> bytes:
    """The figure as a PNG file's bytes; the figure is closed.

    Figures lay themselves out (``layout="constrained"``, or fixed margins): a tight bounding
    box would draw every figure twice, and drawing is most of a report's time.
    """
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    pyplot().close(fig)
    return buffer.getvalue()


def _png(fig) -> str:
    return base64.b64encode(png_bytes(fig)).decode()


def _bin_centers(r: float, n: int) -> list[float]:
    width = 2 * r / n
    return [-r + width * (i + 0.5) for i in range(n)]


LINES_UP_TO = 8  # layers drawn as one line each; more are drawn as one heatmap

# the families shown together in one view each, in the report's order
FAMILY_VIEWS = (
    ("activations", ACTIVATIONS),
    ("normalizations", ("batchnorm", "norm")),
    ("linear and conv layers", ("linear", "conv")),
    ("embeddings and attention", ("embedding", "attention")),
)


def _histogram_view(panels: list[tuple[str, list]], xlabel: str, alt: str) -> str:
    """Histograms side by side as HTML, one panel per ``(title, series)``; ``series`` is
    [(label, range, counts)]. Up to ``LINES_UP_TO`` layers, a figure whose panels draw a line
    per layer; for more, ``_heatmaps``."""
    if max(len(series) for _, series in panels) > LINES_UP_TO:
        return _heatmaps(panels, xlabel, alt)
    plt = pyplot()
    # one legend below the panels: the panels' layers are the first panel's
    height = FIGSIZE[1] + 0.15 * math.ceil(len(panels[0][1]) / 2)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(FIGSIZE[0], height), layout="constrained", squeeze=False
    )
    colors = {label: f"C{i % 10}" for i, (label, _, _) in enumerate(panels[0][1])}
    for i, (ax, (title, series)) in enumerate(zip(axes[0], panels, strict=True)):
        for label, r, counts in series:
            total = sum(counts) or 1.0
            x, y = _bin_centers(r, len(counts)), [c / total for c in counts]
            ax.plot(x, y, color=colors.get(label), label=label if i == 0 else None)
        ax.set(title=title, xlabel=xlabel, ylabel="fraction")
    if panels[0][1]:
        fig.legend(loc="outside lower center", ncol=2, fontsize=7)
    return _img(_png(fig), alt)


HEATMAP_HEIGHT = 720  # pixels a heatmap takes at most; a layer's row, 3 to 12 of them
NAME_HEIGHT = 11  # pixels a layer's name takes: every name, or every few, by the row height


def _heatmaps(panels: list[tuple[str, list]], xlabel: str, alt: str) -> str:
    """Each panel a heatmap of layers (rows, the first panel's, in order) by value (columns),
    each row its fraction of the layer's values over the layer's own range, as an image of one
    pixel a value; the layers' names and the titles are HTML beside it. A matplotlib figure
    would spend most of its time laying out the names."""
    labels = [label for label, _, _ in panels[0][1]]
    row = max(3, min(12, HEATMAP_HEIGHT // max(len(labels), 1)))  # pixels a layer
    step = math.ceil(NAME_HEIGHT / row)  # a name every `step` layers
    names = "".join(
        f'<div style="height:{row * step}px">{html.escape(label)}</div>' for label in labels[::step]
    )
    cells = ["<div></div>"] + [f"<div>{html.escape(title)}</div>" for title, _ in panels]
    cells.append(f'<div class="names">{names}</div>')
    for title, series in panels:
        by_label = {label: counts for label, _, counts in series}
        width = max((len(c) for c in by_label.values()), default=1)
        rows = [by_label.get(label) or [0.0] * width for label in labels]  # aligned by name
        png = _heatmap_png([[c / (sum(counts) or 1.0) for c in counts] for counts in rows])
        cells.append(
            f'<img alt="{html.escape(f"{alt}: {title}")}" style="height:{row * len(labels)}px" '
            f'src="data:image/png;base64,{png}">'
        )
    columns = f"max-content repeat({len(panels)}, 1fr)"
    return (
        f'<div class="heatmaps" style="grid-template-columns: {columns}">{"".join(cells)}</div>'
        f'<p class="axis">{html.escape(xlabel)}, from −range to +range, each row over its '
        "own range; colour: the fraction of the row's values (viridis, dark to light)</p>"
    )


def _heatmap_png(rows: list[list[float]]) -> str:
    """The rows as a PNG of one pixel a value, viridis over their whole range, as base64."""
    import numpy as np

    buffer = io.BytesIO()
    pyplot().imsave(buffer, np.asarray(rows or [[0.0]], dtype=float), cmap="viridis", format="png")
    return base64.b64encode(buffer.getvalue()).decode()


def kind_views(snap: Snapshot) -> list[str]:
    """One view (HTML) per family of layers present: their output histograms beside their
    output gradients' histograms."""
    views = []
    for title, families in FAMILY_VIEWS:
        layers = [x for x in snap.layers if x.family in families]
        if not layers:
            continue
        outputs = [(x.name, x.hist_range, x.hist) for x in layers]
        grads = [(x.name, x.grad_hist_range, x.grad_hist) for x in layers if x.grad_hist]
        full = f"{title}: outputs and their gradients at step {snap.step:,} ({len(layers)} layers)"
        panels = [(f"{title}: outputs", outputs)]
        if grads:
            panels.append((f"gradients ({len(grads)})", grads))
        views.append(f"<h3>{html.escape(full)}</h3>" + _histogram_view(panels, "value", full))
    return views


def activation_histograms(snap: Snapshot, which: str) -> str:
    layers = [x for x in snap.layers if x.family in ACTIVATIONS] or snap.layers
    series = [(x.name, x.hist_range, x.hist) for x in layers]
    title = f"layer outputs at step {snap.step:,}"
    return _histogram_view([(title, series)], "value", f"activation histograms, {which}")


def weight_gradient_histograms(snap: Snapshot) -> str:
    params = [p for p in snap.params if len(p.shape) >= 2 and p.grad_hist]
    series = [(p.name, p.grad_hist_range, p.grad_hist) for p in params]
    title = f"weight gradients at step {snap.step:,}"
    return _histogram_view([(title, series)], "gradient", "weight-gradient histograms")


def update_ratio_figure(update_history: dict[str, list[tuple[int, float]]]) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE, layout="constrained")
    few = len(update_history) <= LINES_UP_TO  # many: thin lines, no legend
    for name, points in update_history.items():
        steps, values = [s for s, _ in points], [v for _, v in points]
        ax.plot(steps, values, label=name, linewidth=1.5 if few else 0.6)
    ax.axhline(-3, color="k", linestyle="--", linewidth=1, label="1e-3")
    ax.set_title(f"update:data ratio of each weight matrix ({len(update_history)})")
    ax.set_xlabel("step")
    ax.set_ylabel("log10(update std / data std)")
    if few:
        ax.legend(fontsize=7, ncol=2)
    return _png(fig)


def loss_figure(metrics: list[dict]) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=FIGSIZE, layout="constrained")
    steps = [r["step"] for r in metrics]
    for key in ("train_loss", "val_loss"):
        ax.plot(steps, [r[key] for r in metrics], marker="o", markersize=3, label=key[:-5])
    ax.set_title("loss on the whole splits (eval mode)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy")
    ax.legend()
    return _png(fig)


def second_order_figure(history: list[Snapshot]) -> str:
    """The sharpness against its stability line, and the gradient noise scale against the batch
    size, at every recording that measured them."""
    measured = [(s.step, s.second_order) for s in history if s.second_order is not None]
    plt = pyplot()
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(2 * FIGSIZE[0], FIGSIZE[1]), layout="constrained"
    )
    lines = [(step, stability_line(so)) for step, so in measured]
    lines = [(step, found) for step, found in lines if found is not None]
    if lines:
        written = lines[-1][1][2]
        left.plot([s for s, _ in lines], [f[0] for _, f in lines], "o-", label="sharpness")
        left.plot(
            [s for s, _ in lines],
            [f[1] for _, f in lines],
            "k--",
            label=f"stability line {written}",
        )
        left.set_yscale("log")
        left.legend(fontsize=7)
    left.set_title("sharpness λmax and its stability line")
    left.set_xlabel("step")
    noise = [(step, so.noise_scale, so.batch_size) for step, so in measured if so.noise_scale]
    if noise:
        right.plot(
            [s for s, _, _ in noise], [n for _, n, _ in noise], "o-", label="noise scale B_simple"
        )
        right.plot([s for s, _, _ in noise], [b for _, _, b in noise], "k--", label="batch size")
        right.set_yscale("log")
        right.legend(fontsize=7)
    right.set_title("gradient noise scale and the batch size")
    right.set_xlabel("step")
    return _png(fig)


def signal_propagation_figure(snap: Snapshot) -> str:
    """Activation and gradient std against depth."""
    plt = pyplot()
    layers = [x for x in snap.layers if x.family in ACTIVATIONS] or snap.layers
    depth = list(range(1, len(layers) + 1))
    from matplotlib.ticker import MaxNLocator, NullLocator

    fig, (left, right) = plt.subplots(1, 2, figsize=FIGSIZE)
    fig.subplots_adjust(left=0.08, right=0.98, bottom=0.16, top=0.9, wspace=0.25)  # fixed: cheap
    left.plot(depth, [x.std for x in layers], marker="o")
    left.set_title(f"activation std, step {snap.step:,}")
    right.semilogy(depth, [x.grad_std or math.nan for x in layers], marker="o", color="C1")
    right.set_title(f"gradient std, step {snap.step:,}")
    right.yaxis.set_minor_locator(NullLocator())  # a tick mark each costs as much as a line
    for ax in (left, right):
        ax.set_xlabel("activation layer (depth)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _png(fig)


def _table(rows: list[tuple], header: tuple) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _img(png: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{png}">'


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 2px 8px; text-align: left; }
th { background: #f3f3f3; } .ok { color: #1a7f37; } .bad { color: #b42318; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 8px; } img { max-width: 100%; }
pre { background: #f6f6f6; padding: 8px; font-size: 0.8em; overflow-x: auto; }
h3 { font-size: 0.95em; font-weight: normal; margin: 1.2em 0 0.3em; }
.heatmaps { display: grid; gap: 2px 8px; font-size: 9px; align-items: end; }
.heatmaps img { width: 100%; image-rendering: pixelated; display: block; }
.heatmaps .names div { line-height: 11px; overflow: hidden; white-space: nowrap; }
.axis { font-size: 0.8em; color: #555; margin-top: 2px; }
"""


@dataclass
class Page:
    """What a report page shows; a section whose field is empty is left out."""

    title: str
    summary: dict  # the final losses and the run's facts (summary.json)
    config: dict = field(default_factory=dict)  # the run's configs
    metrics: list[dict] = field(default_factory=list)  # the periodic evaluations
    report: Report | None = None  # the last recording, judged
    history: list[Snapshot] = field(default_factory=list)  # the kept recordings, first to last
    samples: list[tuple[str, bool]] = field(default_factory=list)  # (sample, seen in train)


def render_html(page: Page) -> str:
    """The whole page as one HTML string, images embedded."""
    title, summary, config, metrics = page.title, page.summary, page.config, page.metrics
    diag, history, samples = page.report, page.history, page.samples
    losses = [
        (k, f"{summary[k]:.4f}")
        for k in ("loss", "train_loss", "val_loss", "test_loss")
        if summary.get(k) is not None
    ]
    facts = losses + [
        (k, summary[k]) for k in ("steps", "params", "wall_s", "seed", "preset") if k in summary
    ]
    parts = [f"<h1>{html.escape(title)}</h1>", "<h2>Result</h2>", _table(facts, ("", "value"))]
    if metrics:
        parts += ["<h2>Loss</h2>", _img(loss_figure(metrics), "loss curves")]
    if diag is not None:
        if diag.verdicts:
            rows = [(v.kind, v.layer, v.message) for v in diag.verdicts]
            verdicts = f'<p class="bad">{len(rows)} verdict(s) at step {diag.snapshot.step:,}</p>'
            verdicts += _table(rows, ("verdict", "where", "what crossed the line"))
        else:
            verdicts = (
                f'<p class="ok">No verdict fired at step {diag.snapshot.step:,}: '
                "healthy by every check.</p>"
            )
        snap = diag.snapshot
        several = bool(history) and history[0] is not snap  # a run's; else one (an audit)
        ends = [(history[0], "first"), (snap, "last")] if several else [(snap, "only")]
        parts += [
            "<h2>Verdicts</h2>",
            verdicts,
            "<h2>Signal propagation</h2>",
            '<div class="grid">',
            *[
                _img(signal_propagation_figure(s), f"signal propagation at the {w} recording")
                for s, w in ends
            ],
            "</div>",
        ]
        if several:  # one recording's activations are the first view below
            parts += [
                "<h2>Activations at the first and the last recording</h2>",
                '<div class="grid">',
                *[f"<div>{activation_histograms(s, f'{w} recording')}</div>" for s, w in ends],
                "</div>",
            ]
        parts += [
            "<h2>Every layer, by kind, at the last recording</h2>",
            *kind_views(snap),
            weight_gradient_histograms(snap),
            *(
                [
                    "<h2>Curvature and gradient noise</h2>",
                    _img(second_order_figure(history or [snap]), "sharpness and noise scale"),
                ]
                if any(s.second_order is not None for s in history or [snap])
                else []
            ),
            "<h2>Update:data ratio</h2>",
            _img(update_ratio_figure(diag.update_history), "update to data ratio over time")
            if several
            else "<p>One recording: each weight's update:data ratio is in the table below "
            "(log10 upd:data).</p>",
            "<h2>Diagnostics table</h2>",
            f"<pre>{html.escape(format_table(diag))}</pre>",
        ]
    if samples:
        rows = [(s or "(empty)", "in train" if seen else "new") for s, seen in samples]
        parts += ["<h2>Samples</h2>", _table(rows, ("sample", ""))]
    parts += ["<h2>Config</h2>", f"<pre>{html.escape(json.dumps(config, indent=2))}</pre>"]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )


def write_report(path: Path, html_text: str) -> None:
    atomic_write_bytes(Path(path), html_text.encode())


# ---------------------------------------------------------------------------- TensorBoard


def open_tensorboard(out: Path):
    """A SummaryWriter for ``out/tensorboard``, or a one-line error saying how to install it."""
    from normlab.errors import NormlabError

    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise NormlabError(
            "--tensorboard needs the tensorboard package: pip install tensorboard"
        ) from None
    return SummaryWriter(log_dir=str(Path(out) / "tensorboard"))


def log_metrics(writer, row: dict) -> None:
    for key in ("train_loss", "val_loss", "lr"):
        writer.add_scalar(f"loss/{key}" if key != "lr" else "lr", row[key], row["step"])


def snapshot_scalars(snap: Snapshot) -> dict[str, float]:
    """One recording's scalars by name, as every logger takes them."""
    scalars = {}
    for layer in snap.layers:
        scalars[f"activation_std/{layer.name}"] = layer.std
        if layer.saturated is not None:
            scalars[f"saturated/{layer.name}"] = layer.saturated
        if layer.dead is not None:
            scalars[f"dead/{layer.name}"] = layer.dead
        if layer.grad_std is not None:
            scalars[f"gradient_std/{layer.name}"] = layer.grad_std
    for p in snap.params:
        if p.update_to_data:
            scalars[f"log10_update_to_data/{p.name}"] = math.log10(p.update_to_data)
    so = snap.second_order
    for key in ("sharpness", "preconditioned_sharpness", "hessian_trace", "noise_scale"):
        value = getattr(so, key) if so is not None else None
        if value is not None and math.isfinite(value):
            scalars[f"second_order/{key}"] = value
    return scalars


def log_histograms(writer, snap: Snapshot) -> None:
    """One recording's histograms to a TensorBoard ``SummaryWriter``."""
    for layer in snap.layers:
        _add_histogram(writer, f"activations/{layer.name}", layer.hist_range, layer.hist, snap.step)
    for p in snap.params:
        if p.grad_hist:
            tag = f"weight_gradients/{p.name}"
            _add_histogram(writer, tag, p.grad_hist_range, p.grad_hist, snap.step)


def log_snapshot(writer, snap: Snapshot) -> None:
    """Scalars and histograms of one diagnostics recording, to TensorBoard."""
    for tag, value in snapshot_scalars(snap).items():
        writer.add_scalar(tag, value, snap.step)
    log_histograms(writer, snap)


def _add_histogram(writer, tag: str, r: float, counts: list[float], step: int) -> None:
    if not sum(counts):
        return
    width = 2 * r / len(counts)
    limits = [-r + width * (i + 1) for i in range(len(counts))]
    centers = _bin_centers(r, len(counts))
    writer.add_histogram_raw(
        tag,
        min=-r,
        max=r,
        num=int(sum(counts)),
        sum=sum(c * x for c, x in zip(counts, centers, strict=True)),
        sum_squares=sum(c * x * x for c, x in zip(counts, centers, strict=True)),
        bucket_limits=limits,
        bucket_counts=counts,
        global_step=step,
    )
