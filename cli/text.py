"""All terminal text: the summary, integer I/O parameters, the tensor report, and the
mapping of the library's backquoted parameter names to this command line's flags."""

from __future__ import annotations

import re
from pathlib import Path

from .options import FLAGS, algorithm_flag

_PARAMETER = re.compile(r"`([^`]+)`")


def for_cli(text: str) -> str:
    """A library message as the CLI user reads it: `exclude` -> --exclude."""
    return _PARAMETER.sub(lambda m: FLAGS.get(m.group(1), m.group(1)), text)


def one_line(text: str) -> str:
    """Never more than one line: control characters from names are escaped."""
    return text.replace("\r", "\\r").replace("\n", "\\n")


def warnings(summary) -> list[str]:
    """The summary's warnings, for stderr (they are notes of the summary too)."""
    return [one_line(for_cli(note)) for note in summary.get("notes", []) if note.startswith("warning: ")]


def format_io(edited) -> list[str]:
    if not edited:
        return []
    lines = ["integer inputs/outputs (real = scale * (q - zero_point); also in the model metadata):"]
    for io in edited:
        lines.append(f"  {io['kind']} '{io['name']}': {io['dtype']}, scale {io['scale']:.9g}, "
                     f"zero point {io['zero_point']}")
    return lines


def _names(names: list[str], shown: int = 4) -> str:
    return ", ".join(names[:shown]) + (f", ... (+{len(names) - shown})" if len(names) > shown else "")


def format_summary(summary, output: Path | None, rows: int = 10) -> str:
    nodes = summary["nodes"]
    by_op = ", ".join(f"{op} {n}" for op, n in nodes["quantized_by_op"].items())
    lines = [f"wrote {output}"] if output is not None else []
    lines.append(f"nodes: {nodes['original']} original, {nodes['optimized']} after optimization, "
                 f"{nodes['quantized']} quantized ({by_op})")
    if nodes.get("quantized_names"):
        lines.append(f"  quantized (names as --exclude matches them): {_names(nodes['quantized_names'], 8)}")
    if nodes["activations_folded_into_q"]:
        lines.append(f"  {nodes['activations_folded_into_q']} Relu/Clip folded into the following quantize")
    reasons: dict[str, list[str]] = {}
    for entry in nodes["float"]:
        reasons.setdefault(entry["reason"], []).append(entry["node"])
    if reasons:
        lines.append(f"left float: {len(nodes['float'])} nodes")
        for reason, names in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"  {len(names):4d} x {for_cli(reason)}: {_names(names)}")
    size = summary["size_bytes"]
    lines.append(f"size: {size['before'] / 1e6:.2f} MB -> {size['after'] / 1e6:.2f} MB")
    equalized = summary.get("equalization")
    if equalized is not None:
        absorbed = (f"; absorbed high biases of {equalized['absorbed_biases']} layers "
                    f"({equalized['absorbed_channels']} channels)" if equalized["absorbed_biases"] else "")
        db = equalized.get("output_sqnr_db") or {}
        checked = f" ({db['equalized']:.1f} dB with, {db['not']:.1f} dB without)" if db else ""
        if equalized.get("kept") is False:
            lines.append(f"equalization of {equalized['pairs']} layer pairs dropped{checked}")
        else:
            lines.append(f"equalized {equalized['pairs']} layer pairs{absorbed}{checked}")
    calib = summary.get("calibration")
    if calib and calib["method"] != "none":
        lines.append(f"calibration: {calib['method'].lower()} over {calib['samples']} samples, "
                     f"{calib['tensors']} tensors")
        auto = calib.get("auto")
        if auto:
            db = auto["output_sqnr_db"]
            others = ", ".join(f"{name} {value:.1f} dB" for name, value in db.items() if name != auto["picked"])
            best = max(db, key=db.get)
            within = (f"; {best} is higher but within the spread over the samples" if db[best] > db[auto["picked"]]
                      else "")
            lines.append(f"  auto: {auto['picked']} ({db[auto['picked']]:.1f} dB output SQNR on the accuracy "
                         f"samples; {others}{within})")
        corrected = calib.get("bias_correction")
        if corrected and corrected["corrected"]:
            db = corrected["output_sqnr_db"]
            verdict = "kept" if corrected["kept"] else "dropped"
            lines.append(f"  bias correction: {corrected['corrected']} biases, {verdict}"
                         + (f" ({db['corrected']:.1f} dB with, {db['uncorrected']:.1f} dB without)" if db else ""))
        smoothed = calib.get("smooth_quant")
        if smoothed and smoothed["smoothed"]:
            db = smoothed["output_sqnr_db"]
            lines.append(f"  smooth quant: smoothed {smoothed['smoothed']} MatMul inputs "
                         f"(alpha median {smoothed['alpha_median']:g}), {'kept' if smoothed['kept'] else 'dropped'}"
                         + (f" ({db['smoothed']:.1f} dB with, {db['unsmoothed']:.1f} dB without)" if db else ""))
        rounded = calib.get("adaround")
        if rounded and rounded["rounded"]:
            db = rounded["output_sqnr_db"]
            slowest = max(rounded["layers"].items(), key=lambda kv: kv[1]["seconds"])
            lines.append(f"  adaround: {rounded['rounded']} weights, {'kept' if rounded['kept'] else 'dropped'}"
                         + (f" ({db['rounded']:.1f} dB with, {db['nearest']:.1f} dB without)" if db else "")
                         + f"; layer error x{rounded['median_error_ratio']:.2f} of nearest (median), "
                           f"{rounded['seconds']:.1f} s (slowest {slowest[0]} {slowest[1]['seconds']:.1f} s)")
        for name, (low, high) in calib.get("overridden", {}).items():
            lines.append(f"  range of '{name}' set to [{low:g}, {high:g}] (--input-range)")
        for name, count in calib["nonfinite_values"].items():
            lines.append(f"  warning: {count} NaN/Inf values in '{name}' were ignored")
    target = summary.get("target")
    where = f"target {target['name']}" + (f" (for {target['requested']})" if target["requested"] != target["name"] else "") + "; " if target else ""
    if summary.get("mode", "static") == "static":
        weights = target["weights"]["dtype"] if target and target["weights"]["dtype"] != "int8" else \
            f"int8 {summary['weight_range']} range"
        lines.append(f"{where}weights: {weights}; activations: {summary['activation_dtype']}"
                     + (" symmetric (zero point 0)" if target and target["activations"]["symmetric"] else ""))
    else:
        forms: dict[str, int] = {}
        for form in nodes.get("forms", {}).values():
            forms[form] = forms.get(form, 0) + 1
        lines.append(f"{where}mode {summary['mode']}")
        lines.extend(f"  {n} x {form}" for form, n in forms.items())
    lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in summary["seconds"].items()))
    lines.extend(f"note: {for_cli(note)}" for note in summary.get("notes", []))
    lines.extend(format_io(summary.get("io", [])))
    lines.extend(report_lines(summary, rows))
    return "\n".join(lines)


def report_lines(summary, rows: int = 10) -> list[str]:
    """Terminal lines for the protected nodes and the worst tensors of ``summary``."""
    lines = []
    protected = summary.get("protected") or []
    if protected:
        lines.append(f"protected (kept float, --no-protect to disable): {len(protected)} nodes")
        lines.extend(f"  {p['node']}: {for_cli(p['reason'])}" for p in protected)
    tensors = summary.get("tensors")
    if not tensors:
        return lines
    samples = summary.get("report_samples", 0)
    shown = tensors[:rows]
    more = f"; all {len(tensors)} in the JSON report" if len(tensors) > len(shown) else ""
    if samples:
        lines.append(f"per-tensor SQNR, int8 vs float on {samples} samples (worst first{more}):")
    else:
        lines.append(f"per-tensor parameters (no samples for SQNR{more}):")
    lines.append(f"  {'SQNR dB':>8}  {'bits':>4}  {'scale':>10}  {'zp':>5}  {'range':<23} tensor (node)")
    for entry in shown:
        db = entry["sqnr_db"]
        if db is not None:
            db_text = f"{db:8.1f}"
        else:  # not measured, exact, or an all-zero float tensor that the int8 model got wrong
            db_text = {None: "-", 0.0: "exact"}.get(entry["mse"], "-inf").rjust(8)
        low, high = entry["range"] or entry["grid"]
        where = f" ({entry['node']})" if entry["node"] else " (input)"
        lines.append(f"  {db_text}  {entry.get('bits', 8):4d}  {entry['scale']:10.4g}  {entry['zero_point']:5d}  "
                     f"{f'[{low:.4g}, {high:.4g}]':<23} {entry['tensor']}{where}")
    return lines


def trial_setting(trial) -> str:
    """A trial's method and the algorithms it added: ``mse_asym + equalize + adaround``."""
    return " + ".join([trial.method.lower(), *map(algorithm_flag, getattr(trial, "algorithms", ()))])


def format_trial(trial, max_trials: int) -> str:
    loss = f", loss {trial.loss:.2%}" if trial.loss is not None else ""
    kept = f", float: {', '.join(trial.excluded)}" if trial.excluded else ""
    kept += f", 16-bit: {', '.join(trial.wide)}" if getattr(trial, "wide", None) else ""
    return (f"trial {trial.number}/{max_trials}: {trial_setting(trial)}{kept}: metric "
            f"{trial.metric:.6g}{loss} -> {'pass' if trial.passed else 'fail'}")


def format_skipped(skipped) -> str:
    """An algorithm trial autotune did not evaluate, one line."""
    return one_line(f"skipped {' + '.join(map(algorithm_flag, skipped.algorithms))} (no trial spent): "
                    f"{for_cli(skipped.reason)}")


def format_target(target, full: bool = False) -> str:
    """A target's declaration, readable; ``full`` lists every op rule."""
    a, w = target.activations, target.weights
    sym = "symmetric, zero point 0" if a.symmetric else "asymmetric"
    allowed = f" (allowed: {', '.join(a.dtypes)})" if len(a.dtypes) > 1 else ""
    scale = []
    for what, rule in (("activation", a.scale), ("weight", w.scale)):
        if rule.power_of_two:
            scale.append(f"{what} scales powers of two")
        if rule.minimum > 0:
            scale.append(f"{what} scale >= {rule.minimum:g}")
    lines = [
        f"{target.name}: {target.description}" if target.description else target.name,
        f"  activations: {a.dtype} {sym}{allowed}",
        (f"  weights: int8 {w.range} [-{w.qmax}, {w.qmax}]" if w.dtype == "int8" else f"  weights: {w.dtype}, amax / 448")
        + f", {'per-channel' if w.per_channel else 'per-tensor'}"
        + (f" (allowed: {', '.join(w.ranges)})" if len(w.ranges) > 1 else ""),
        f"  bias: {target.bias}",
        f"  Q/DQ: on op {target.placement}"
        + (f"; fused: {', '.join(sorted(target.fused_activations))}" if target.fused_activations else "")
        + ("; scalar Mul folded into DequantizeLinear" if target.fold_scalar_mul else ""),
    ]
    if scale:
        lines.append(f"  scales: {'; '.join(scale)}")
    if target.rewrites:
        lines.append(f"  stage-1 rewrites: {', '.join(target.rewrites)}")
    if full:
        lines.append("  ops:")
        lines += [f"    {op}: {_rule_text(rule)}" for op, rule in sorted(target.ops.items())]
    else:
        lines.append(f"  ops ({len(target.ops)}): {', '.join(sorted(target.ops))}")
    if target.source not in ("", "preset"):
        lines.append(f"  from: {target.source}")
    return "\n".join(lines)


def _rule_text(rule) -> str:
    inputs = "all inputs" if rule.activations is None else "inputs " + ",".join(map(str, rule.activations))
    parts = [inputs]
    if rule.weight is not None:
        parts.append(f"weight {rule.weight}")
    if rule.bias is not None:
        parts.append(f"bias {rule.bias}")
    parts.append(f"output {rule.output}")
    return "; ".join(parts)


def format_calibration(ctx, state_path, shard: str | None) -> str:
    """What `quantize calibrate` did: samples, tensors, the state file, the times."""
    calibrator = ctx.calibrator
    which = f" (shard {shard})" if shard else ""
    lines = [f"wrote {state_path}: {calibrator.samples_seen} samples{which}, {len(calibrator.tensors)} tensors, "
             f"model fingerprint {calibrator.fingerprint[:12]}"]
    lines.append("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in ctx.timings.items()))
    lines.extend(f"note: {for_cli(note)}" for note in ctx.notes)
    return "\n".join(lines)
