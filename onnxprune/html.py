"""The report as one self-contained HTML page: figures embedded as PNG data, no external files,
no scripts. Every string from the model or the user is escaped (node names can be anything)."""

from __future__ import annotations

import base64
from html import escape
from typing import Any, Collection, Iterable, Sequence

from .plots import METRIC_NAMES, curve_figure, figure_png, histogram_figure, sparsity_figure
from .report import Report, allocation_losses, size_text

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:2rem auto;max-width:1100px;color:#222;
padding:0 1rem;line-height:1.4}
h1{font-size:1.5rem;margin-bottom:.2rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #ddd;
padding-bottom:.2rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}td,th{padding:.25rem .7rem;text-align:left;
border-bottom:1px solid #eee;vertical-align:top}th{background:#f6f6f6}td.n{text-align:right;
font-variant-numeric:tabular-nums}
.cards{display:flex;gap:1rem;flex-wrap:wrap;margin:1rem 0}.card{border:1px solid #ddd;border-radius:6px;
padding:.6rem 1rem;min-width:10rem}.card b{display:block;font-size:1.3rem}.ok{color:#1a7f37}.bad{color:#c0392b}
.warn{background:#fff4e5;border-left:4px solid #f0a020;padding:.4rem .8rem;margin:.3rem 0}
img{max-width:100%;height:auto}code{font-size:.85rem}details{margin:.5rem 0}
"""


def render_html(report: Report) -> str:
    """The whole page for `report`."""
    sections = [
        _summary(report),
        _models(report),
        _quality(report),
        _pruning(report),
        _fisher(report),
        _schedule(report),
        _conversion(report),
        _timings(report),
        _table_section("Configuration", report.config.items()),
        _table_section("Environment", report.environment.items()),
    ]
    title = f"onnxprune report: {report.input.path}"
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>\n"
        + "\n".join(s for s in sections if s)
        + f"\n<p><small>onnxprune {escape(report.tool_version)}, report schema {report.schema_version}; "
        f"JSON report: <code>{escape(report.report_path)}</code></small></p>\n</body></html>\n"
    )


# ------------------------------------------------------------------------------ sections


def _summary(report: Report) -> str:
    q, p = report.validation.quality, report.pruning
    metric = METRIC_NAMES.get(q.metric, q.metric)
    split = f"{p.allocation} allocation"
    if p.allocation_search:  # auto: which split, and by how much
        split += f" (auto; held-out loss {allocation_losses(p.allocation_search, '.3g')})"
    cards = [
        ("sparsity", f"{p.sparsity:.4f}", f"target {p.target_sparsity:.2f}, {p.method}, {split}"),
        (metric, f"{q.before:.4f} → {q.after:.4f}", f"drop {q.drop:+.4f} on {report.validation.samples} samples"),
        ("size", f"{size_text(report.input.size_bytes)} → {size_text(report.output.size_bytes)}", _compressed(report)),
        ("time", f"{report.timings.get('total', 0):.1f} s", f"peak memory {size_text(report.peak_memory_bytes)}"),
    ]
    if report.gate is not None:
        g = report.gate
        verdict = "passed" if g.passed else "FAILED"
        cards.append(("gate", verdict, f"drop {g.drop:.4f} vs max-drop {g.max_drop:.4f}"))
    html = [f"<h1>Pruned {escape(report.input.path)}</h1>", f"<p>→ <code>{escape(report.output.path)}</code></p>"]
    html.append("<div class='cards'>")
    for label, value, note in cards:
        css = ""
        if label == "gate":
            css = " class='ok'" if value == "passed" else " class='bad'"
        html.append(f"<div class='card'>{escape(label)}<b{css}>{escape(value)}</b><small>{escape(note)}</small></div>")
    html.append("</div>")
    html += [f"<div class='warn'>{escape(w)}</div>" for w in report.warnings]
    return "\n".join(html)


def _compressed(report: Report) -> str:
    before, after = report.input.compressed_bytes, report.output.compressed_bytes
    if not before or not after:
        return ""
    return f"compressed (zlib) {size_text(before)} → {size_text(after)}"


def _models(report: Report) -> str:
    rows = []
    for label, info in (("input", report.input), ("output", report.output)):
        opsets = ", ".join(f"{domain} {version}" for domain, version in info.opsets.items())
        rows.append(
            [
                label,
                info.path,
                size_text(info.size_bytes),
                size_text(info.compressed_bytes) if info.compressed_bytes else "",
                str(info.ir_version),
                opsets,
                info.producer,
                "yes" if info.external_data else "no",
            ]
        )
    header = ["", "file", "size", "compressed", "IR", "opsets", "producer", "external data"]
    return "<h2>Models</h2>" + _table(header, rows, numeric={2, 3, 4})


def _quality(report: Report) -> str:
    v = report.validation
    rows = []
    if v.accuracy_before is not None:
        rows.append(["accuracy", f"{v.accuracy_before:.4f}", f"{v.accuracy_after:.4f}"])
    if v.top1_agreement is not None:
        rows.append(["top-1 agreement with the original", "1.0000", f"{v.top1_agreement:.4f}"])
    html = [f"<h2>Accuracy and agreement ({v.samples} evaluation samples)</h2>"]
    e = report.evaluation
    html.append(f"<p>Evaluation data: {escape(e.source)}{' (synthetic)' if e.synthetic else ''}.</p>")
    if rows:
        html.append(_table(["metric", "original", "pruned"], rows, numeric={1, 2}))
    outputs = [[o.name, f"{o.max_abs_error:.3e}", f"{o.mean_abs_error:.3e}", f"{o.cosine:.6f}"] for o in v.outputs]
    html.append(_table(["output", "max abs error", "mean abs error", "mean cosine"], outputs, numeric={1, 2, 3}))
    d = v.error_distribution
    if d is not None:
        quantiles = ", ".join(f"{k} {value:.3e}" for k, value in d.quantiles.items())
        html.append(
            f"<p>Output error distribution of <code>{escape(d.output)}</code> ({escape(d.statistic)}): {quantiles}.</p>"
        )
        html.append(_image(figure_png(histogram_figure(d.bin_edges, d.counts, d.statistic)), "error histogram"))
    return "\n".join(html)


def _pruning(report: Report) -> str:
    p = report.pruning
    rows = [
        [
            t.name,
            "×".join(map(str, t.shape)),
            f"{t.numel:,}",
            f"{t.zeros:,}",
            f"{t.sparsity:.4f}",
            ", ".join(t.consumers),
        ]
        for t in p.tensors
    ]
    rows.append(["total", "", f"{p.params:,}", f"{p.zeros:,}", f"{p.sparsity:.4f}", ""])
    html = [f"<h2>Per-tensor sparsity ({len(p.tensors)} tensors)</h2>"]
    figure = sparsity_figure([t.name for t in p.tensors], [t.sparsity for t in p.tensors], p.target_sparsity)
    html.append(_image(figure_png(figure), "per-tensor sparsity"))
    table = _table(["tensor", "shape", "params", "zeros", "sparsity", "consumers"], rows, numeric={2, 3, 4})
    html.append(f"<details open><summary>table</summary>{table}</details>")
    if p.excluded:
        html.append(f"<p>Left dense by --exclude: {escape(', '.join(p.excluded))}</p>")
    if p.repair:
        r = p.repair
        html.append(f"<h2>Repair after pruning ({r['layers']} layers, {r['samples']} calibration samples)</h2>")
        steps = [
            [s["step"], _pass_name(s), f"{s['changed']:,}", f"{s['loss_before']:.4g}", f"{s['loss_after']:.4g}",
             "kept" if s["kept"] else "undone", f"{s['seconds']:.1f}"]
            for s in r["steps"]
        ]  # fmt: skip
        header = ["step", "pass", "changed", "held-out loss before", "after", "", "seconds"]
        html.append(_table(header, steps, numeric={2, 3, 4, 6}))
        if r["skipped"]:
            html.append(f"<p>Not repaired: {escape(', '.join(r['skipped']))}</p>")
    return "\n".join(html)


def _fisher(report: Report) -> str:
    f = report.fisher
    if f is None:
        return ""
    if f.statistics == "layer inputs":
        html = ["<h2>Layer-input statistics</h2>", f"<p>loss {escape(f.loss)}</p>"]
        facts = [
            ("calibration samples", f.num_grads),
            ("input capture time", f"{f.gradient_seconds:.2f} s"),
            ("estimator time", f"{f.estimator_seconds:.2f} s"),
        ]
        facts += [(k, v) for k, v in f.estimator.items()]
        html.append(_table(["setting", "value"], [[k, _text(v)] for k, v in facts]))
        return "\n".join(html)
    html = ["<h2>Second-order statistics</h2>", f"<p>{escape(f.loss)}</p>"]
    facts = [
        ("gradients per estimate", f.num_grads),
        ("samples per gradient", f.fisher_batch),
        ("calibration samples used", f.calibration_samples_used),
        ("memory groups", f.groups),
        ("statistics kept in", f.statistics_storage),
        ("memory estimate / budget", f"{size_text(f.memory_estimate_bytes)} / {size_text(f.memory_budget_bytes)}"),
        ("gradient time", f"{f.gradient_seconds:.2f} s"),
        ("estimator time", f"{f.estimator_seconds:.2f} s"),
    ]
    facts += [(k, v) for k, v in f.estimator.items() if k != "auxiliary_loss"]
    html.append(_table(["setting", "value"], [[k, _text(v)] for k, v in facts]))
    steps = [
        [s.step, f"{s.sparsity:.4f}", f"{s.gradient_seconds:.2f}", f"{s.estimator_seconds:.2f}", s.collections]
        for s in f.steps
    ]
    html.append(
        _table(["step", "sparsity", "gradients (s)", "estimator (s)", "collections"], steps, numeric={0, 1, 2, 3, 4})
    )
    curve = f.estimator.get("auxiliary_loss")
    if curve:
        html.append("<p>FishLeg auxiliary loss, summed over tensors, over all auxiliary steps (lower is better):</p>")
        figure = curve_figure({"auxiliary loss": curve}, "auxiliary step (thinned)", "loss", symlog=True)
        html.append(_image(figure_png(figure), "auxiliary loss"))
    return "\n".join(html)


def _schedule(report: Report) -> str:
    s, t = report.schedule, report.finetune
    if len(s.sparsities) <= 1 and t is None:
        return ""
    html = [f"<h2>Schedule: {escape(s.name)}</h2>"]
    rows = [[i, f"{sp:.4f}", steps] for i, (sp, steps) in enumerate(zip(s.sparsities, s.finetune_steps), 1)]
    html.append(_table(["step", "sparsity", "fine-tuning steps after"], rows, numeric={0, 1, 2}))
    if s.resumed_after:
        html.append(f"<p>Resumed from a checkpoint after step {s.resumed_after}.</p>")
    if s.torch_vs_onnxruntime_max_abs_error is not None:
        html.append(
            f"<p>Written model in onnxruntime vs the final torch model: max abs error "
            f"{s.torch_vs_onnxruntime_max_abs_error:.2e}.</p>"
        )
    if t is not None:
        html.append(
            f"<p>Fine-tuning: {t.steps} steps of {escape(t.optimizer)} (lr {t.lr:g}, batch {t.batch_size}) on "
            f"{t.trained_tensors} tensors in {t.seconds:.1f} s; BatchNorm {escape(t.batchnorm)}. {escape(t.loss)}"
            + (f"; batches augmented: {escape(t.augmentation)}" if t.augmentation != "none" else "")
            + "</p>"
        )
        if t.loss_curve:
            figure = curve_figure({"loss": t.loss_curve}, "optimiser step (thinned)", "training loss")
            html.append(_image(figure_png(figure), "fine-tuning loss"))
    return "\n".join(html)


def _conversion(report: Report) -> str:
    c = report.conversion
    rows = [[o.name, f"{o.max_abs_error:.3e}", f"{o.cosine:.8f}"] for o in c.outputs]
    return (
        f"<h2>Conversion check</h2><p>The dense torch model against onnxruntime on the original, "
        f"{c.samples} samples: max abs error {c.max_abs_error:.2e} (relative {c.relative_error:.2e}).</p>"
        + _table(["output", "max abs error", "mean cosine"], rows, numeric={1, 2})
    )


def _timings(report: Report) -> str:
    rows = [[stage, f"{seconds:.2f}"] for stage, seconds in report.timings.items()]
    rows.append(["peak memory", size_text(report.peak_memory_bytes)])
    return "<h2>Timings</h2>" + _table(["stage", "seconds"], rows, numeric={1})


def _table_section(title: str, items: Iterable[tuple[str, Any]]) -> str:
    rows = [[key, _text(value)] for key, value in items]
    if not rows:
        return ""
    table = _table(["name", "value"], rows)
    return f"<h2>{escape(title)}</h2><details><summary>{len(rows)} entries</summary>{table}</details>"


# ------------------------------------------------------------------------------ helpers


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(_text(v) for v in value) if len(value) <= 12 else f"{len(value)} values"
    if isinstance(value, float):
        return f"{value:g}"
    return "" if value is None else str(value)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Collection[int] = frozenset()) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td{' class=n' if i in numeric else ''}>{escape(str(c))}</td>" for i, c in enumerate(row))
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(png: bytes, alt: str) -> str:
    return f"<p><img alt='{escape(alt)}' src='data:image/png;base64,{base64.b64encode(png).decode()}'></p>"


def _pass_name(step: dict) -> str:
    """A repair pass as the table names it (the update pass with the fraction it kept)."""
    return step["addition"] + (f" × {step['scale']:g}" if "scale" in step else "")
