"""The visual report: one self-contained HTML page (inline SVG drawn here, no scripts,
no external files) for a quantization run (``quantization_page``) or a comparison
(``comparison_page``).

The numbers on the page are the JSON report's: the page embeds the same data as JSON in
``<script type="application/json" id="report-data">`` (for a run: ``summary.as_dict()``,
exactly what a .json report file holds; for a comparison: ``Comparison.as_dict()``).
What only the page shows -- the tensors in graph order with the SQNR each node loses, the
calibration histograms downsampled for drawing, every method's range, the shares of
values clipped and rounded to zero -- is in ``<script type="application/json"
id="chart-data">``.  Every chart is an ``<svg class="chart">``; ``<body data-charts="N">``
says how many there are.
"""

from __future__ import annotations

import collections
import html
import json
import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from .report import LOSS_CAP_DB as CAP_DB
from .report import sqnr_lost

__all__ = ["DROP_THRESHOLD_DB", "MAX_DRAWN_BINS", "comparison_page", "histogram_shares", "page_data",
           "quantization_page", "write_html"]

DROP_THRESHOLD_DB = 6.0  # a node losing more SQNR than this is highlighted (about one bit)
MAX_DRAWN_BINS = 128  # histograms are summed down to at most this many bins for drawing

_FAMILY_COLORS = {"MIN_MAX": "#444", "PERCENTILE": "#1f77b4", "ENTROPY": "#2ca02c", "MSE": "#9467bd",
                  "SQNR": "#ff7f0e"}
_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1320px}
h1{font-size:22px}h2{font-size:18px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:6px 0}td,th{padding:2px 8px;border-bottom:1px solid #eee;text-align:left;
vertical-align:top}th{background:#f6f6f6}td.n{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:10px}.card{border:1px solid #ddd;border-radius:4px;padding:6px;width:372px}
.card.float{border-color:#d62728;background:#fff6f6}.card h3{font-size:12px;margin:0 0 2px;word-break:break-all}
.card p{margin:2px 0;font-size:12px}.tag{color:#d62728;font-weight:600}code{font-size:12px}
svg.chart{display:block;background:#fff;max-width:100%;height:auto}.legend span{margin-right:14px;font-size:12px;white-space:nowrap}
details{margin:4px 0}
"""


# -- shared helpers -----------------------------------------------------------------------

def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _json_script(element_id: str, data) -> str:
    """A JSON data island; ``<``, ``>`` and ``&`` escaped so no text can end the element."""
    text = json.dumps(data, indent=None, sort_keys=True)
    text = text.replace("&", "\\u0026").replace("<", "\\u003c").replace(">", "\\u003e")
    return f'<script type="application/json" id="{element_id}">{text}</script>'


def _num(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}g}"


def _db(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return f"{value:.2f}" if math.isfinite(value) else ("inf" if value > 0 else "-inf")


def _pct(share) -> str:
    return "-" if share is None else f"{100 * share:.3g} %"


def _table(header: Sequence[str], rows: Iterable[Sequence], numeric: Iterable[int] = ()) -> str:
    numeric = set(numeric)
    out = ["<table><tr>", *(f"<th>{_e(h)}</th>" for h in header), "</tr>"]
    for row in rows:
        out.append("<tr>")
        out.extend(f'<td class="n">{_e(c)}</td>' if i in numeric else f"<td>{_e(c)}</td>" for i, c in enumerate(row))
        out.append("</tr>")
    out.append("</table>")
    return "".join(out)


def _page(title: str, body: Sequence[str], charts: int, data_islands: Sequence[str]) -> str:
    return "".join([
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head>",
        f'<body data-charts="{charts}">', *body, *data_islands, "</body></html>\n",
    ])


def _f(x: float) -> str:
    """An SVG coordinate: one decimal keeps the file small."""
    return f"{x:.1f}".rstrip("0").rstrip(".") if math.isfinite(x) else "0"


# -- histogram numbers --------------------------------------------------------------------

def histogram_shares(counts: np.ndarray, lo: float, width: float, value_range: Sequence[float] | None,
                     scale: float | None, minimum: float | None = None,
                     maximum: float | None = None) -> tuple[float | None, float | None]:
    """(share clipped, share rounded to zero) of a histogram's values: clipped lie outside
    ``value_range`` (the chosen range), rounded to zero have |x| < scale / 2.

    Each bin's values are taken as spread evenly over the bin, cut to the observed
    [minimum, maximum]; a bin cut to one point (every value equal, e.g. inputs saturated
    at exactly 1.0) holds its values at that point.  The shares are as fine as the bins: a
    bin starting at 0 holds a Relu's exact zeros, all counted as rounded to zero only when
    scale / 2 covers the bin (it does when the range is not far narrower than the observed
    extent: scale = range / 255, bins = extent / 2048 at most)."""
    counts = np.asarray(counts, np.float64)
    total = float(counts.sum())
    if total <= 0 or width <= 0:
        return None, None
    a = lo + width * np.arange(counts.size)
    b = a + width
    if minimum is not None:
        a, b = np.maximum(a, minimum), np.maximum(b, minimum)
    if maximum is not None:
        a, b = np.minimum(a, maximum), np.minimum(b, maximum)
    extent = b - a
    spread = extent > 0
    safe = np.where(spread, extent, 1.0)

    def below(x: float, inclusive: bool) -> float:
        """Values < x (or <= x: only point masses differ)."""
        point = (a <= x) if inclusive else (a < x)
        share = np.where(spread, np.clip((x - a) / safe, 0.0, 1.0), point)
        return float(counts @ share)

    clipped = None
    if value_range is not None:
        low, high = float(value_range[0]), float(value_range[1])
        clipped = min(max((below(low, False) + total - below(high, True)) / total, 0.0), 1.0)
    rounded = None
    if scale is not None and scale > 0:
        rounded = min(max((below(scale / 2, False) - below(-scale / 2, True)) / total, 0.0), 1.0)
    return clipped, rounded


def _downsample(counts: np.ndarray, lo: float, width: float, bins: int = MAX_DRAWN_BINS):
    """Trimmed to the nonzero extent, then summed in groups to at most ``bins`` bins."""
    nonzero = np.flatnonzero(counts)
    if nonzero.size == 0:
        return np.zeros(0, np.int64), lo, width
    counts = counts[nonzero[0]: nonzero[-1] + 1]
    lo = lo + nonzero[0] * width
    group = -(-counts.size // bins)
    if group > 1:
        padded = np.zeros(-(-counts.size // group) * group, counts.dtype)
        padded[:counts.size] = counts
        counts = padded.reshape(-1, group).sum(axis=1)
        width *= group
    return counts.astype(np.int64), lo, width


# -- the data of a quantization page ------------------------------------------------------

def _capped(entry: Mapping) -> float | None:
    if entry.get("sqnr_db") is not None:
        return min(entry["sqnr_db"], CAP_DB)
    if entry.get("mse") is None:
        return None  # not measured
    return 0.0 if entry["mse"] else CAP_DB


def _graph_order(ctx, tensors: Iterable[str]) -> list[str]:
    """The tensors in stage-1 graph order: graph inputs, then node outputs (topological)."""
    wanted = set(tensors)
    order = [i.name for i in ctx.stage1.graph.input if i.name in wanted]
    for node in ctx.stage1.graph.node:
        order.extend(o for o in node.output if o in wanted)
    seen = set(order)
    return order + sorted(wanted - seen)


def _sqnr_lost(ctx, entries: Sequence[dict]) -> dict[str, float]:
    """{tensor: SQNR its producing quantized node loses} (report.sqnr_lost, autotune's measure)."""
    return {tensor: lost for tensor, (_, lost) in sqnr_lost(ctx.stage1, ctx.outcome.plan, entries).items()}


def _method_ranges(ctx) -> dict[str, dict[str, list[float]]]:
    """{method: {tensor: [lo, hi]}} for every method the collected histograms allow."""
    from .calibrators import CalibrationMethod
    from .errors import QuantizerError

    calibrator = ctx.calibrator
    if calibrator is None or not calibrator.samples_seen or ctx.inputs.ranges is not None:
        return {}
    if not all(s.with_histogram for s in calibrator.statistics.values()):
        methods = [m for m in CalibrationMethod if m.family == "MIN_MAX"]
    else:
        methods = list(CalibrationMethod)
    found = {}
    for method in methods:
        ranges = ctx.ranges_by_method.get(method)
        if ranges is None:
            try:
                ranges = calibrator.compute_range(method)
            except QuantizerError:  # e.g. a tensor without finite values: the page shows the rest
                continue
        found[method.value] = {t: [float(lo), float(hi)] for t, (lo, hi) in ranges.items()}
    return found


def page_data(ctx, drop_threshold_db: float = DROP_THRESHOLD_DB) -> dict:
    """What the page draws beyond the summary: the tensors in graph order with the SQNR
    lost at their node, and one histogram entry per quantized tensor with statistics."""
    entries = list(ctx.tensor_report["tensors"]) if ctx.tensor_report else []
    by_tensor = {e["tensor"]: e for e in entries}
    order = _graph_order(ctx, by_tensor)
    lost = _sqnr_lost(ctx, entries) if entries else {}
    tensors = [{"tensor": t, "node": by_tensor[t]["node"], "op_type": by_tensor[t]["op_type"],
                "sqnr_db": by_tensor[t]["sqnr_db"], "shown_db": _capped(by_tensor[t]), "lost_db": lost.get(t)}
               for t in order]

    float_nodes = {f.node: f.reason for f in ctx.summary.nodes.float}
    producers = {out: node.name for node in ctx.stage1.graph.node for out in node.output}
    consumers = collections.defaultdict(list)
    for node in ctx.stage1.graph.node:
        for i in node.input:
            consumers[i].append(node.name)
    kept = {**{n: "excluded" for n in ctx.excluded}, **{p["node"]: "protected" for p in ctx.protected},
            **{n: "kept float" for n in ctx.keep_float}}

    methods = _method_ranges(ctx)
    statistics = ctx.calibrator.statistics if ctx.calibrator is not None else {}
    histograms = []
    for tensor in order:
        stats = statistics.get(tensor)
        if stats is None or not stats.with_histogram or stats.count == 0 or stats.counts.size == 0:
            continue
        entry = by_tensor[tensor]
        full = stats.histogram()
        value_range = entry["range"] if entry["range"] is not None else entry["grid"]
        clipped, rounded = histogram_shares(full.counts, full.lo, full.width, value_range, entry["scale"],
                                            stats.minimum, stats.maximum)
        counts, lo, width = _downsample(stats.counts, full.lo, full.width)
        near = [producers.get(tensor), *consumers.get(tensor, ())]
        marks = sorted({f"{n}: {kept[n]}" for n in near if n in kept})
        histograms.append({
            "tensor": tensor, "range": value_range, "grid": entry["grid"], "scale": entry["scale"],
            "zero_point": entry["zero_point"], "min": stats.minimum, "max": stats.maximum,
            "clipped": clipped, "rounded_to_zero": rounded, "counts": counts.tolist(), "lo": float(lo),
            "width": float(width),
            "methods": {m: r[tensor] for m, r in methods.items() if tensor in r},
            "float_nodes": marks or sorted(f"{n}: {float_nodes[n]}" for n in near if n in float_nodes),
            "marked": bool(marks),
        })
    return {"tensors": tensors, "histograms": histograms, "drop_threshold_db": drop_threshold_db,
            "cap_db": CAP_DB, "kept_float": {n: r for n, r in sorted(kept.items())}}


# -- charts ---------------------------------------------------------------------------------

def _sqnr_chart(tensors: Sequence[dict], threshold: float) -> str:
    """Bars of each tensor's SQNR in graph order (capped at CAP_DB), red where its node
    loses more than ``threshold`` dB, a line over the bar tops; names on hover."""
    shown = [t for t in tensors if t["shown_db"] is not None]  # measured
    width, height, left, bottom, top = 1260, 260, 44, 24, 10
    plot_w, plot_h = width - left - 8, height - bottom - top
    n = max(len(shown), 1)
    step = plot_w / n
    y = lambda db: top + plot_h * (1 - min(max(db, 0.0), CAP_DB) / CAP_DB)
    out = [f'<svg class="chart" id="sqnr-chart" xmlns="http://www.w3.org/2000/svg" width="{width}" '
           f'height="{height}" viewBox="0 0 {width} {height}" font-size="11">'
           f"<title>per-tensor SQNR in graph order</title>"]
    for db in range(0, int(CAP_DB) + 1, 10):
        out.append(f'<line x1="{left}" x2="{width - 8}" y1="{_f(y(db))}" y2="{_f(y(db))}" stroke="#eee"/>'
                   f'<text x="{left - 4}" y="{_f(y(db) + 4)}" text-anchor="end">{db}</text>')
    out.append(f'<text x="4" y="{top + 8}">dB</text>')
    points = []
    for i, t in enumerate(shown):
        db, value = t["sqnr_db"], t["shown_db"]
        lost = t["lost_db"]
        color = "#d62728" if lost is not None and lost > threshold else ("#9ecae1" if db is not None else "#c7e9c0")
        x = left + i * step
        top_y = y(value)
        text = (f"{t['tensor']} ({t['node']}, {t['op_type']}): SQNR "
                f"{_db(db) + ' dB' if db is not None else ('exact' if value else 'no signal')}"
                + (f", lost {lost:.2f} dB at this node" if lost is not None else ""))
        out.append(f'<rect x="{_f(x)}" y="{_f(top_y)}" width="{_f(max(step - 0.5, 0.6))}" '
                   f'height="{_f(top + plot_h - top_y)}" fill="{color}"><title>{_e(text)}</title></rect>')
        points.append(f"{_f(x + step / 2)},{_f(top_y)}")
    if points:
        out.append(f'<polyline fill="none" stroke="#08519c" stroke-width="1" points="{" ".join(points)}"/>')
    out.append(f'<line x1="{left}" x2="{width - 8}" y1="{top + plot_h}" y2="{top + plot_h}" stroke="#888"/>'
               f'<text x="{left}" y="{height - 6}">input</text>'
               f'<text x="{width - 8}" y="{height - 6}" text-anchor="end">output ({len(shown)} tensors, '
               f'graph order)</text></svg>')
    return "".join(out)


def _histogram_chart(h: dict) -> str:
    """Log counts as one step path; the chosen range shaded, every method's range as ticks."""
    width, height, pad, axis = 360, 128, 6, 92
    counts = np.asarray(h["counts"], np.float64)
    lo, bin_w = h["lo"], h["width"]
    xs = [lo, lo + bin_w * counts.size, *h["range"], *h["grid"]]
    for r in h["methods"].values():
        xs.extend(r)
    xs = [v for v in xs if v is not None and math.isfinite(v)]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi <= x_lo:
        x_lo, x_hi = x_lo - 0.5, x_hi + 0.5
    span = x_hi - x_lo
    sx = lambda v: pad + (width - 2 * pad) * (v - x_lo) / span
    logs = np.log10(1.0 + counts)
    peak = float(logs.max()) if logs.size else 1.0
    ys = axis - (axis - pad) * logs / (peak or 1.0)
    edges = [sx(lo + bin_w * i) for i in range(counts.size + 1)]
    d = [f"M{_f(edges[0])} {axis}"]
    for i, yv in enumerate(ys):
        d.append(f"V{_f(yv)}H{_f(edges[i + 1])}")
    d.append(f"V{axis}Z")
    r_lo, r_hi = sx(h["range"][0]), sx(h["range"][1])
    title = (f"{h['tensor']}: range [{_num(h['range'][0])}, {_num(h['range'][1])}], scale {_num(h['scale'])}, "
             f"zero point {h['zero_point']}, clipped {_pct(h['clipped'])}, rounded to 0 {_pct(h['rounded_to_zero'])}")
    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-size="10"><title>{_e(title)}</title>',
           f'<rect x="{_f(r_lo)}" y="{pad}" width="{_f(max(r_hi - r_lo, 0.5))}" height="{axis - pad}" '
           f'fill="#fdf1d6"><title>chosen range [{_num(h["range"][0])}, {_num(h["range"][1])}]</title></rect>',
           f'<path d="{"".join(d)}" fill="#6baed6" stroke="#08519c" stroke-width="0.5"/>',
           f'<line x1="{_f(r_lo)}" x2="{_f(r_lo)}" y1="{pad}" y2="{axis}" stroke="#d62728"/>'
           f'<line x1="{_f(r_hi)}" x2="{_f(r_hi)}" y1="{pad}" y2="{axis}" stroke="#d62728"/>',
           f'<line x1="{pad}" x2="{width - pad}" y1="{axis}" y2="{axis}" stroke="#888"/>']
    if x_lo < 0 < x_hi:
        out.append(f'<line x1="{_f(sx(0))}" x2="{_f(sx(0))}" y1="{axis}" y2="{axis + 3}" stroke="#000"/>')
    for name, (m_lo, m_hi) in h["methods"].items():
        family, form = name.rsplit("_", 1)
        row = axis + (6 if form == "ASYM" else 16)
        out.append(f'<path d="M{_f(sx(m_lo))} {row}v8M{_f(sx(m_hi))} {row}v8" stroke="{_FAMILY_COLORS[family]}" '
                   f'stroke-width="1.5"><title>{_e(name.lower())}: [{_num(m_lo)}, {_num(m_hi)}]</title></path>')
    out.append(f'<text x="{pad}" y="{height - 2}">{_e(_num(x_lo))}</text>'
               f'<text x="{width - pad}" y="{height - 2}" text-anchor="end">{_e(_num(x_hi))}</text></svg>')
    return "".join(out)


def _bars_chart(values: Sequence[tuple[str, float]], reference: float | None, caption: str) -> str:
    """Horizontal bars of SQNR values (dB), e.g. an output's worst samples; ``reference``
    (the SQNR over all samples) as a dashed line."""
    finite = [v for _, v in values if math.isfinite(v)] + ([reference] if reference is not None
                                                           and math.isfinite(reference) else [])
    hi = max([max(finite, default=1.0), 1.0])
    width, row, left = 620, 18, 200
    height = row * max(len(values), 1) + 26
    sx = lambda v: left + (width - left - 60) * min(max(v, 0.0), hi) / hi
    out = [f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-size="11"><title>{_e(caption)}</title>']
    for i, (name, value) in enumerate(values):
        y0 = 4 + i * row
        shown = value if math.isfinite(value) else hi
        label = name if len(name) <= 30 else name[:14] + "..." + name[-13:]
        out.append(f'<text x="{left - 4}" y="{y0 + 12}" text-anchor="end">{_e(label)}</text>'
                   f'<rect x="{left}" y="{y0}" width="{_f(sx(shown) - left)}" height="{row - 4}" fill="#6baed6">'
                   f"<title>{_e(name)}: {_db(value)} dB</title></rect>"
                   f'<text x="{_f(sx(shown) + 4)}" y="{y0 + 12}">{_db(value)}</text>')
    if reference is not None and math.isfinite(reference):
        out.append(f'<line x1="{_f(sx(reference))}" x2="{_f(sx(reference))}" y1="0" y2="{height - 20}" '
                   f'stroke="#d62728" stroke-dasharray="4 3"><title>over all samples: {_db(reference)} dB'
                   f"</title></line>")
    out.append(f'<text x="{left}" y="{height - 6}">0 dB</text><text x="{width - 60}" y="{height - 6}" '
               f'text-anchor="end">{_db(hi)} dB</text></svg>')
    return "".join(out)


# -- the quantization page ----------------------------------------------------------------

def _summary_section(s: Mapping, extra: Mapping) -> list[str]:
    target = s.get("target") or {}
    nodes = s["nodes"]
    calibration = s["calibration"]
    size = s["size_bytes"]
    rows = [
        ("target", f"{target.get('name', '-')} (requested {target.get('requested', '-')})"
                   + (f": {target['description']}" if target.get("description") else "")),
        ("calibration", f"{calibration['method']} over {calibration['samples']} samples, "
                        f"{calibration['tensors']} tensors"),
        ("activations / weights", f"{s.get('activation_dtype') or '-'} / {s.get('weight_range')}"),
        ("nodes", f"{nodes['original']} original, {nodes['optimized']} after optimization, {nodes['quantized']} "
                  f"quantized ({', '.join(f'{op} {n}' for op, n in nodes['quantized_by_op'].items())}), "
                  f"{len(nodes['float'])} float, {nodes['activations_folded_into_q']} activations folded into Q"),
        ("size", f"{size['before']:,} bytes -> {size['after']:,} bytes"
                 + (f" ({size['after'] / size['before']:.1%})" if size.get("before") else "")),
        ("time", ", ".join(f"{k} {v:.2f}s" for k, v in s["seconds"].items())),
    ]
    if s.get("input"):
        rows.append(("input", s["input"]))
    if s.get("output"):
        rows.append(("output", s["output"]))
    if s.get("fusion"):
        fusion = s["fusion"]
        rows.append(("integer kernels", f"{fusion.get('integer_nodes')} of {fusion.get('quantized_nodes')} quantized "
                                        f"nodes; {len(fusion.get('float_island_nodes') or ())} in float islands"))
    if s.get("fidelity") and s["fidelity"].get("sqnr_db"):
        rows.append(("fidelity", ", ".join(f"{k} {_db(v)} dB" for k, v in s["fidelity"]["sqnr_db"].items())))
    out = ["<h2>Summary</h2>", _table(("", ""), rows)]

    by_reason = collections.defaultdict(list)
    for f in nodes["float"]:
        by_reason[f["reason"]].append(f"{f['node']} ({f['op_type']})")
    if by_reason:
        out.append(f"<h3>Float nodes ({len(nodes['float'])})</h3>")
        out.append(_table(("reason", "nodes", "count"),
                          [(r, ", ".join(n[:40]) + (f", ... (+{len(n) - 40})" if len(n) > 40 else ""), len(n))
                           for r, n in sorted(by_reason.items(), key=lambda kv: -len(kv[1]))], numeric=(2,)))
    if s["protected"]:
        out.append(f"<h3>Protected nodes ({len(s['protected'])})</h3>")
        out.append(_table(("node", "reason"), [(p["node"], p.get("reason", "")) for p in s["protected"]]))
    kept = extra.get("kept_float", {})
    if kept:
        out.append(f"<h3>Excluded / kept float ({len(kept)})</h3>")
        out.append(_table(("node", "why"), sorted(kept.items())))
    if s.get("autotune"):
        tune = s["autotune"]
        out.append(f"<h3>Autotune (float metric {_num(tune['baseline'], 6)}, "
                   f"{'passed' if tune['passed'] else 'not passed'}, chosen trial {tune['chosen_trial']})</h3>")
        out.append(_table(("trial", "method", "algorithms", "kept float", "metric", "loss", "passed"),
                          [(t["number"], t["method"], ", ".join(t.get("algorithms", ())), len(t["excluded"]),
                            _num(t["metric"], 6), _num(t["loss"]), "yes" if t["passed"] else "no")
                           for t in tune["trials"]],
                          numeric=(0, 3, 4, 5)))
        if tune.get("skipped"):
            out.append("<p>Algorithm trials skipped (no trial spent): " + "; ".join(
                f"{_e(' + '.join(s['algorithms']))}: {_e(s['reason'])}" for s in tune["skipped"]) + "</p>")
    if s["notes"]:
        out.append("<h3>Notes</h3><ul>" + "".join(f"<li>{_e(n)}</li>" for n in s["notes"]) + "</ul>")
    out.append("<details><summary>Steps</summary>"
               + _table(("step", "seconds", "changed"),
                        [(st["step"], f"{st['seconds']:.3f}", st.get("changed") or "") for st in s["steps"]],
                        numeric=(1,)) + "</details>")
    out.append("<details><summary>Versions</summary>"
               + _table(("package", "version"), sorted(s["versions"].items())) + "</details>")
    return out


def _histogram_card(h: dict) -> str:
    css = "card float" if h["marked"] else "card"
    lines = [f'<div class="{css}"><h3>{_e(h["tensor"])}</h3>', _histogram_chart(h),
             f"<p>range [{_num(h['range'][0])}, {_num(h['range'][1])}] &middot; scale {_num(h['scale'])} "
             f"&middot; zero point {h['zero_point']}</p>",
             f"<p>clipped {_pct(h['clipped'])} &middot; rounded to 0 {_pct(h['rounded_to_zero'])} &middot; "
             f"observed [{_num(h['min'])}, {_num(h['max'])}]</p>"]
    for mark in h["float_nodes"]:
        lines.append(f'<p class="tag">{_e(mark)}</p>')
    lines.append("</div>")
    return "".join(lines)


def quantization_page(ctx, drop_threshold_db: float = DROP_THRESHOLD_DB) -> str:
    """The HTML report of a finished run (after the pipeline's ``summarize`` step)."""
    summary = ctx.summary.as_dict()
    extra = page_data(ctx, drop_threshold_db)
    name = summary.get("input") or "model"
    body = [f"<h1>Quantization report: {_e(name)}</h1>"]
    body.extend(_summary_section(summary, extra))
    charts = 0
    body.append("<h2>Per-tensor SQNR</h2>")
    if any(t["shown_db"] is not None for t in extra["tensors"]):
        body.append(f"<p>int8 against float on {summary.get('report_samples')} samples, tensors in graph order "
                    f"(capped at {CAP_DB:g} dB). <span style=\"color:#d62728\">Red</span>: the node loses more "
                    f"than {drop_threshold_db:g} dB (worst quantized input minus output). Hover a bar for "
                    "its tensor.</p>")
        body.append(_sqnr_chart(extra["tensors"], drop_threshold_db))
        charts += 1
        worst = sorted((t for t in extra["tensors"] if t["lost_db"] is not None), key=lambda t: -t["lost_db"])[:15]
        body.append("<details open><summary>Largest SQNR losses</summary>"
                    + _table(("tensor", "node", "op", "SQNR dB", "lost dB"),
                             [(t["tensor"], t["node"], t["op_type"], _db(t["sqnr_db"]), _db(t["lost_db"]))
                              for t in worst], numeric=(3, 4)) + "</details>")
    else:
        body.append("<p>No per-tensor SQNR (no report samples).</p>")
    body.append(f"<h2>Calibration histograms ({len(extra['histograms'])})</h2>")
    if extra["histograms"]:
        legend = "".join(f'<span style="color:{c}">&#9646; {f.lower()}</span>' for f, c in _FAMILY_COLORS.items())
        body.append("<p>Log counts; shaded with red lines: the chosen range. Ticks below the axis: each method's "
                    "range (upper row _asym, lower row _sym; hover for values). Red cards: next to an excluded, "
                    f"protected or kept-float node.</p><p class=\"legend\">{legend}</p>")
        body.append('<div class="grid">' + "".join(_histogram_card(h) for h in extra["histograms"]) + "</div>")
        charts += len(extra["histograms"])
    else:
        body.append("<p>No histograms: the calibration kept none (min_max without protection, or given "
                    "ranges).</p>")
    return _page(f"quantization report: {name}", body, charts,
                 [_json_script("report-data", summary), _json_script("chart-data", extra)])


# -- the comparison page ------------------------------------------------------------------

def comparison_page(comparison) -> str:
    """The HTML page of a ``compare_models`` result: per-output table, each output's worst
    samples as a chart, the tensors' SQNR when compared."""
    data = comparison.as_dict()
    body = [f"<h1>Comparison: {_e(data['int8_model'] or 'int8')} against {_e(data['float_model'] or 'float')}</h1>",
            f"<p>{data['samples']} sample(s).</p><h2>Outputs</h2>"]
    body.append(_table(
        ("output", "shape", "values", "SQNR dB", "max abs err", "mean abs err", "cosine", "top-1 agreement",
         "non-finite"),
        [(o["name"], "x".join(map(str, o["shape"])), o["values"], _db(o["sqnr_db"]), _num(o["max_abs_error"], 6),
          _num(o["mean_abs_error"], 6), _num(o["cosine"], 8),
          "-" if o["top1_agreement"] is None else f"{o['top1_agreement']:.2f}% of {o['top1_rows']}", o["nonfinite"])
         for o in data["outputs"]], numeric=(2, 3, 4, 5, 6, 8)))
    charts = 0
    for o in comparison.outputs:
        if not o.worst_samples:
            continue
        body.append(f"<h3>Worst samples of {_e(o.name)}</h3>")
        body.append(_bars_chart([(s.sample, s.sqnr_db) for s in o.worst_samples], o.sqnr_db,
                                f"worst samples of {o.name} (dashed: over all samples)"))
        charts += 1
    if comparison.tensors:
        body.append(f"<h2>Tensors ({len(comparison.tensors)}, worst SQNR first)</h2>")
        shown = comparison.tensors[:40]
        body.append(_bars_chart([(t.name, t.sqnr_db) for t in shown], None, "intermediate tensors' SQNR"))
        charts += 1
        body.append(_table(("tensor", "int8 tensor read", "SQNR dB", "max abs err", "mean abs err"),
                           [(t["name"], t["int8_tensor"], _db(t["sqnr_db"]), _num(t["max_abs_error"], 6),
                             _num(t["mean_abs_error"], 6)) for t in data["tensors"]], numeric=(2, 3, 4)))
    if data["notes"]:
        body.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(n)}</li>" for n in data["notes"]) + "</ul>")
    return _page("comparison report", body, charts, [_json_script("report-data", data)])


def write_html(path, text: str, transaction=None) -> None:
    """Write ``text`` atomically (renamed into place by ``transaction`` when given)."""
    from .model_io import write_atomic

    data = text.encode("utf-8")
    write_atomic(path, lambda handle: handle.write(data), transaction=transaction)
