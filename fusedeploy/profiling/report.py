"""The deployment sign-off: report.json, a self-contained report.html with plots, and report.md.

The sign-off judges the compressed artifact in the profile's runtime: each
speed and memory budget against the figure projected onto the target from
this host's measurements, the quality budget against the measured perplexity
ratio to the dense artifact (on text calibration never read), the zero-shot
retention budget against the deployed artifact's acc_norm over its dense peer's,
both scored by lm-eval in the deployed runtime, and every artifact's verify
result (a failed verify fails it).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .budgets import BY_NAME, PROJECTED


def quality_check(budget: float, deployed: dict, dense: dict | None) -> dict:
    """The perplexity ratio of the deployed artifact to the dense one, both as measured in their runtime."""
    from ..judge import finite, reason

    if dense is None:  # nothing was compressed: the deployed artifact is the dense model
        ratio, note = 1.0, "not compressed: the deployed artifact is the dense model"
    else:
        ratio = deployed["verify"]["ppl_artifact"] / dense["verify"]["ppl_artifact"]
        note = f"{deployed['name']} vs {dense['name']}"
    b = BY_NAME["max_perplexity_ratio"]
    ok = b.meets(ratio, budget)
    check = {"figure": ratio, "op": b.op, "budget": budget, "basis": b.basis,
             "result": "PASS" if ok else "FAIL", "note": note}
    if not ok:
        check["reason"] = (f"the compressed model's perplexity is {ratio:.2f}x the dense model's, over {budget:g}x"
                           if finite(ratio) else reason("perplexity ratio", ratio, b.op, budget))
    return check


def accuracy_check(budget: float, tasks: dict | None) -> dict:
    """The largest accuracy drop (dense - compressed) over the build's tasks; no tasks given is a FAIL."""
    b = BY_NAME["max_accuracy_drop"]
    if not tasks:
        return {"figure": float("nan"), "op": b.op, "budget": budget, "basis": b.basis, "result": "FAIL",
                "reason": "the profile budgets task accuracy but the build ran no tasks; give --eval-tasks"}
    worst = max(tasks, key=lambda t: tasks[t]["drop"])
    drop = tasks[worst]["drop"]
    ok = b.meets(drop, budget)
    check = {"figure": drop, "op": b.op, "budget": budget, "basis": b.basis, "result": "PASS" if ok else "FAIL",
             "note": f"worst task: {worst} ({tasks[worst]['metric']})"}
    if not ok:
        check["reason"] = (f"{worst}: {tasks[worst]['metric']} fell from {tasks[worst]['dense']:.3f} to "
                           f"{tasks[worst]['compressed']:.3f}, a drop over {budget:g}")
    return check


def zero_shot_check(budget: float, zero_shot: dict | None) -> dict:
    """Zero-shot retention (compressed over dense acc_norm on one seeded subset); no zero-shot data is a FAIL."""
    from ..judge import finite, reason

    b = BY_NAME["min_zero_shot_retention"]
    if not zero_shot:
        return {"figure": float("nan"), "op": b.op, "budget": budget, "basis": b.basis, "result": "FAIL",
                "reason": "the profile budgets zero-shot retention but the build scored no zero-shot data; "
                          "give --zero-shot"}
    fig, d, c = zero_shot["retention"], zero_shot["dense"], zero_shot["compressed"]
    metric = zero_shot["metric"]
    ok = b.meets(fig, budget)
    check = {"figure": fig, "op": b.op, "budget": budget, "basis": b.basis, "result": "PASS" if ok else "FAIL",
             "se": zero_shot["retention_se"], "n": zero_shot["subset"]["n"],
             "note": f"{metric} {c[metric]:.4f} / {d[metric]:.4f} on {zero_shot['subset']['n']} items; "
                     f"scored: {c['scored']}, {c['runtime']}"}
    if not ok:
        check["reason"] = (f"zero-shot {metric} fell from {d[metric]:.3f} (dense) to {c[metric]:.3f}, retention "
                           f"{fig:.3f} +/- {zero_shot['retention_se']:.3f} under {budget:g}"
                           if finite(fig) else reason("zero-shot retention", fig, b.op, budget))
    return check


def projection_check(shape, profile, deployed: dict, dense: dict, removed: int, prompt_tokens: int,
                     new_tokens: int, host: dict) -> dict:
    """The planner's projection of the deployed candidate, ideal and calibrated, beside the measured-then-projected.

    The calibration is the efficiency the dense artifact reached on this host (planner.efficiency_from):
    the planner, so calibrated, should land within PROJECTION_TOLERANCE of what the profiler projects
    from measuring the compressed artifact itself.
    """
    from dataclasses import asdict

    from .measure import efficiency
    from .planner import IDEAL, estimate

    eff = efficiency(shape, dense["measured"], host, dense["runtime"], dense["precision"], shape.blocks,
                     source=f"{dense['name']} measured on this host")
    out = {"efficiency": asdict(eff), "tolerance": PROJECTION_TOLERANCE}
    for label, e in (("planner_ideal", IDEAL), ("planner_calibrated", eff)):
        c = estimate(shape, profile, removed / shape.blocks, deployed["precision"], e)
        out[label] = {"decode_tokens_per_s": c.decode_tokens_per_s, "time_to_first_token_s": c.time_to_first_token_s}
    measured = {k: deployed["projected"][k] for k in ("decode_tokens_per_s", "time_to_first_token_s")}
    out["measured_projected"] = measured
    out["calibrated_error"] = {k: out["planner_calibrated"][k] / v - 1 for k, v in measured.items()}
    out["within_tolerance"] = all(abs(e) <= PROJECTION_TOLERANCE for e in out["calibrated_error"].values())
    return out


PROJECTION_TOLERANCE = 0.15


def serving_check(budget: float, concurrency: int, serving: dict | None) -> dict:
    """Served output tokens/s at the budget's client count, projected onto the profile as decode speed is."""
    from ..judge import finite, reason

    b = BY_NAME["min_serving_tokens_per_s"]
    check = {"figure": float("nan"), "op": b.op, "budget": budget, "basis": b.basis, "concurrency": concurrency}
    level = measured = None
    if serving is not None:
        level = next((lv for lv in serving["projected"]["levels"] if lv["concurrency"] == concurrency), None)
        measured = next((lv for lv in serving["measured"]["levels"] if lv["concurrency"] == concurrency), None)
    if level is None or measured is None:
        return {**check, "result": "FAIL", "reason": f"no serving load test at {concurrency} clients was run"}
    fig, ratio = level["output_tokens_per_s"], serving["projected"]["bandwidth_ratio"]
    ok = b.meets(fig, budget)
    check.update(figure=fig, result="PASS" if ok else "FAIL", measured=measured["output_tokens_per_s"],
                 bandwidth_ratio=ratio,
                 note=f"{serving.get('artifact', 'deployed artifact')} served to {concurrency} clients: "
                      f"{measured['output_tokens_per_s']:.4g} output tokens/s measured on this host x bandwidth "
                      f"ratio {ratio:.3g}")
    if not ok:
        check["reason"] = (f"served output {fig:.4g} tokens/s at {concurrency} clients (projected; "
                           f"{measured['output_tokens_per_s']:.4g} measured on this host) is under {budget:g}"
                           if finite(fig) else reason("served output tokens/s", fig, b.op, budget))
        if measured["errors"]:
            check["reason"] += (f"; {measured['errors']} of {measured['requests_started']} requests failed "
                                f"({measured['first_error']})")
    return check


def signoff(profile: dict, deployed: dict, verifies: list[dict], dense: dict | None = None,
            tasks: dict | None = None, serving: dict | None = None, zero_shot: dict | None = None) -> dict:
    """PASS/FAIL per budget for the deployed artifact, plus verification; NaN/Inf figures FAIL with a reason.

    A measurement taken on a busy host, or one whose runs spread widely, is
    flagged in `measurement.warnings` rather than signed off silently.
    """
    from ..judge import finite, reason

    b = profile["budgets"]
    p = deployed["projected"]
    budgets = {}
    for budget in PROJECTED:  # memory and speed: the profiler's figures projected onto the target
        fig, lim = p[budget.figure], b[budget.name]
        ok = budget.meets(fig, lim)
        budgets[budget.name] = {"figure": fig, "op": budget.op, "budget": lim, "basis": budget.basis,
                                "result": "PASS" if ok else "FAIL"}
        if not ok:
            budgets[budget.name]["reason"] = reason(budget.name, fig, budget.op, lim)
    if b.get("max_perplexity_ratio") is not None:
        budgets["max_perplexity_ratio"] = quality_check(b["max_perplexity_ratio"], deployed, dense)
    if b.get("max_accuracy_drop") is not None:
        budgets["max_accuracy_drop"] = accuracy_check(b["max_accuracy_drop"], tasks)
    if b.get("min_zero_shot_retention") is not None:
        budgets["min_zero_shot_retention"] = zero_shot_check(b["min_zero_shot_retention"], zero_shot)
    if b.get("min_serving_tokens_per_s") is not None:
        budgets["min_serving_tokens_per_s"] = serving_check(b["min_serving_tokens_per_s"], b["serving_concurrency"],
                                                            serving)
    failed_verifies, reasons = [], []
    for v in verifies:
        bad = [k for k in ("max_rel_diff", "mean_abs_diff", "top1_agreement", "ppl_ratio") if k in v and not finite(v[k])]
        if not v["passed"] or bad:
            failed_verifies.append(v["artifact"])
            reasons += [f"{v['artifact']}: {f}" for f in v.get("failures", [])]
            reasons += [f"{v['artifact']}: {k} is {v[k]} (not a finite number)" for k in bad]
    verify = {"result": "FAIL" if failed_verifies else "PASS", "failed": failed_verifies, "reasons": reasons}
    overall = all(c["result"] == "PASS" for c in budgets.values()) and not failed_verifies
    return {"artifact": deployed["name"], "budgets": budgets, "verify": verify,
            "measurement": _with_serving_load(measurement_flags(deployed.get("measured", {})), serving),
            "result": "PASS" if overall else "FAIL"}


def measurement_flags(measured: dict) -> dict:
    """Whether the speed figures can be trusted: host load during measurement and the spread of runs."""
    host = measured.get("host_load") or {}
    spread = measured.get("spread")
    warnings = []
    if host.get("busy"):
        warnings.append(f"measured on a busy host: other processes used {host.get('others_cores_during', 0):.1f} "
                        f"of {host.get('cores', 0)} cores during measurement (load before "
                        f"{host.get('others_cores_before', 0):.1f}); speed figures may be too low -- re-run on an idle machine")
    if spread is not None and not measured.get("stable", True):
        warnings.append(f"decode speed spread {spread:.0%} across runs after {measured.get('runs')} runs; "
                        "figures are noisy -- re-run on an idle machine")
    return {"host_load": host, "spread": spread, "stable": measured.get("stable"),
            "trusted": not warnings, "warnings": warnings}


def _with_serving_load(flags: dict, serving: dict | None) -> dict:
    """The measurement flags, plus a warning when the serving load test ran on a busy host."""
    host = (serving or {}).get("measured", {}).get("host_load") or {}
    if not host.get("busy"):
        return flags
    warning = (f"the serving load test ran on a busy host: other processes used {host['others_cores_during']:.1f} "
               f"of {host['cores']} cores during it (before: {host['others_cores_before']:.1f}); its figures may be "
               "too low -- re-run on an idle machine")
    return {**flags, "trusted": False, "warnings": flags["warnings"] + [warning]}


@dataclass(frozen=True)
class Table:
    """One table of the report: written as a Markdown table in report.md and an HTML table in report.html."""

    header: tuple[str, ...]
    rows: list[tuple[str, ...]]

    def markdown(self) -> list[str]:
        return ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)] + \
            ["| " + " | ".join(row) + " |" for row in self.rows]

    def html(self, css_class=lambda column, cell: "") -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join("<tr>" + "".join(_td(cell, css_class(i, cell)) for i, cell in enumerate(row)) + "</tr>"
                       for row in self.rows)
        return f"<div class='table'><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _td(cell: str, css: str) -> str:
    return f"<td class='{css}'>{_inline(cell)}</td>" if css else f"<td>{_inline(cell)}</td>"


def _inline(text: str) -> str:
    """The report's Markdown inline marks (`code`, **bold**) as HTML; everything else escaped."""
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", out)


def _serving_markdown(serving: dict | None) -> list[str]:
    """The load test's table as Markdown lines (a caption, then the table)."""
    return _render_markdown(_serving_blocks(serving))


def _serving_blocks(serving: dict | None) -> list:
    """The load test's table: per client count, throughput and latency percentiles (measured; tok/s also projected)."""
    if not serving:
        return []
    m, p = serving["measured"], serving["projected"]
    projected = {lv["concurrency"]: lv for lv in p["levels"]}

    def ms(d: dict, key: str) -> str:
        return "-" if d.get(key) is None else f"{d[key] * 1000:.1f}"

    rows = []
    for lv in m["levels"]:
        t, itl = lv["ttft_s"], lv["token_latency_s"]
        rows.append((str(lv["concurrency"]), f"{lv['requests_per_s']:.2f}", f"{lv['output_tokens_per_s']:.1f}",
                     f"{projected[lv['concurrency']]['output_tokens_per_s']:.1f}", f"{ms(t, 'p50')} / {ms(t, 'p95')}",
                     f"{ms(itl, 'p50')} / {ms(itl, 'p95')} / {ms(itl, 'p99')}",
                     f"{lv['requests_completed']} / {lv['errors']}"))
    return [f"Serving load test: `{serving.get('artifact')}` behind `fusedeploy serve`, {m['duration_s']:g} s per "
            f"level, {m['max_tokens']} output tokens per request; measured on this host (output tok/s also "
            f"projected: x bandwidth ratio {p['bandwidth_ratio']:.3g}).",
            Table(("clients", "req/s", "out tok/s measured", "projected", "TTFT p50 / p95 ms",
                   "per-token p50 / p95 / p99 ms", "done / errors"), rows)]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _plots(report: dict) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arts = report["artifacts"]
    names = [a["name"] for a in arts]
    colors = ["#888888" if a["variant"] == "dense" else "#2a7ab0" for a in arts]
    b = report["profile"]["budgets"]
    out = {}

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh(names, [a["projected"]["memory_gb"] for a in arts], color=colors)
    ax.axvline(b["max_memory_gb"], color="red", linestyle="--", label="budget")
    ax.set_xlabel("GB (projected onto the profile)")
    ax.set_title("Memory against the budget")
    ax.legend()
    out["memory"] = _png(fig)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3))
    for ax, key, label in ((axes[0], "decode_tokens_per_s", "decode tokens/s"),
                           (axes[1], "time_to_first_token_s", "time to first token, s")):
        measured = [a["measured"]["metrics"][key]["median"] for a in arts]
        projected = [a["projected"][key] for a in arts]
        x = range(len(arts))
        ax.bar([i - 0.2 for i in x], measured, 0.4, label="measured (this host)", color="#bbbbbb")
        ax.bar([i + 0.2 for i in x], projected, 0.4, label="projected (target)", color="#2a7ab0")
        ax.set_xticks(list(x), names, rotation=20, ha="right")
        ax.set_title(label)
        ax.legend(fontsize=7)
    out["speed"] = _png(fig)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh(names, [a["verify"]["ppl_artifact"] for a in arts], color=colors)
    ax.set_xlabel(f"perplexity ({report['settings']['eval_data']}, lower is better)")
    ax.set_title("Perplexity of each artifact in its runtime")
    out["perplexity"] = _png(fig)
    plt.close(fig)
    if report.get("quality_curve"):
        out["quality curve"] = _curve_plot(plt, report["quality_curve"], b)
    return out


def _curve_plot(plt, curve: dict, budgets: dict) -> str:
    """Perplexity ratio against projected decode speed, one labelled point per k, the budgets drawn in."""
    pts = curve["points"]
    fig, ax = plt.subplots(figsize=(7, 4))
    x = [p["decode_tokens_per_s"] for p in pts]
    y = [p["perplexity_ratio"] for p in pts]
    ax.plot(x, y, "-", color="#bbbbbb", zorder=1)
    ax.scatter(x, y, c=["#2a7ab0" if p["fits"] else "#a00000" for p in pts], zorder=2)
    for p in pts:
        ax.annotate(str(p["k"]) + (" (chosen)" if p["k"] == curve.get("chosen_k") else ""),
                    (p["decode_tokens_per_s"], p["perplexity_ratio"]), textcoords="offset points", xytext=(4, 4),
                    fontsize=8)
    if budgets.get("max_perplexity_ratio") is not None:
        ax.axhline(budgets["max_perplexity_ratio"], color="red", linestyle="--", label="max perplexity ratio")
    ax.axvline(budgets["min_decode_tokens_per_s"], color="orange", linestyle="--", label="min decode tok/s")
    ax.set_xlabel("decode tokens/s (projected onto the profile)")
    ax.set_ylabel("perplexity / dense (measured)")
    ax.set_title("Quality against speed, one point per number of removed blocks (blue: meets every budget)")
    ax.legend(fontsize=7)
    png = _png(fig)
    plt.close(fig)
    return png


def _budget_table(s: dict) -> Table:
    rows = [(name, f"{c['figure']:.3f}", c["basis"], f"{c['op']} {c['budget']:g}", c["result"])
            for name, c in s["budgets"].items()]
    rows.append(("verify (all artifacts)", "", "", "", s["verify"]["result"]))
    return Table(("budget", "figure", "basis", "limit", "result"), rows)


def _details(report: dict) -> list:
    """The report's body after the title and the budget table: paragraphs (Markdown inline marks) and Tables."""
    blocks: list = []
    texts = report.get("evaluation_text")
    if texts:
        ev, cal = texts["evaluation"], texts["calibration"]
        blocks.append(f"Quality and verify text: `{ev['source']}` ({ev['part']}), {ev['windows']} windows x "
                      f"{ev['ctx']} tokens ({ev['tokens_scored']} scored); calibration read `{cal['source']}` "
                      f"({cal['part']}).")
    blocks += _curve_blocks(report) + _tasks_blocks(report) + _zero_shot_blocks(report) + _projection_blocks(report)
    rows = []
    for a in report["artifacts"]:
        m = a["measured"]["metrics"]
        rows.append((a["name"], f"{a['size_bytes'] / 1e6:.1f}", f"{a['verify']['ppl_artifact']:.2f}",
                     f"{m['decode_tokens_per_s']['median']:.1f}", f"{a['projected']['decode_tokens_per_s']:.1f}",
                     f"{m['time_to_first_token_s']['median']:.3f}", f"{a['projected']['time_to_first_token_s']:.3f}"))
    blocks.append(Table(("artifact", "size MB", "PPL", "decode tok/s measured", "projected", "TTFT s measured",
                         "projected"), rows))
    chosen = report["plan"]["chosen"]
    rows = []
    for c in report["plan"]["candidates"]:
        mark = "chosen" if (c["sparsity"], c["quant"]) == (chosen["sparsity"], chosen["quant"]) else \
            ("yes" if c["fits"] else "no")
        rows.append((f"{c['sparsity']:g}", str(c["kept_blocks"]), c["quant"], f"{c['memory_gb']:.3f}",
                     f"{c['decode_tokens_per_s']:.1f}", f"{c['time_to_first_token_s']:.3f}", mark))
    blocks += ["Planner candidates (projected before building; the chosen one is marked):",
               Table(("sparsity", "blocks", "quant", "memory GB", "decode tok/s", "TTFT s", "fits"), rows)]
    blocks += _serving_blocks(report.get("serving"))
    host = report["host"]
    blocks.append(f"Measured on {host['cpu']} ({host['cores']} cores; {host['memory_bandwidth_gbps']:.1f} GB/s copy "
                  f"bandwidth, {host['compute_tflops']:.3f} TFLOPS fp32 matmul). Projected figures scale these by "
                  "the profile's peak bandwidth (decode) and compute (prefill).")
    return blocks


def _render_markdown(blocks: list) -> list[str]:
    lines: list[str] = []
    for block in blocks:
        lines += [""] + (block.markdown() if isinstance(block, Table) else [block])
    return lines


def _markdown(report: dict) -> str:
    s = report["signoff"]
    lines = [f"# FuseDeploy sign-off: {report['model']} on {report['profile']['name']}: **{s['result']}**", "",
             f"Deployed artifact: `{s['artifact']}`; plan: sparsity {report['plan']['chosen']['sparsity']:g}, "
             f"{report['plan']['chosen']['quant']}.", ""] + _budget_table(s).markdown()
    flags = s.get("measurement", {}).get("warnings", [])
    if flags:
        lines += ["", "**Measurement warning:** " + " ".join(flags)]
    lines += _render_markdown(_details(report))
    return "\n".join(lines) + "\n"


def _curve_blocks(report: dict) -> list:
    curve = report.get("quality_curve")
    if not curve:
        return []
    rows = [(str(p["k"]), f"{p['sparsity']:.3f}", p["precision"], f"{p['perplexity']:.2f}",
             f"{p['perplexity_ratio']:.3f}", f"{p['memory_gb']:.3f}", f"{p['decode_tokens_per_s']:.1f}",
             f"{p['time_to_first_token_s']:.3f}", "yes" if p["fits"] else "no") for p in curve["points"]]
    return [f"Quality curve (one compression run; chosen: {curve['chosen_k']} blocks removed). Perplexity "
            "measured in the deployed runtime; speed and memory projected by the planner calibrated on this host.",
            Table(("removed", "sparsity", "precision", "PPL", "PPL / dense", "memory GB", "decode tok/s", "TTFT s",
                   "meets all"), rows)]


def _tasks_blocks(report: dict) -> list:
    tasks = report.get("task_accuracy")
    if not tasks:
        return []
    rows = [(name, t["metric"], str(t.get("n")), f"{t['dense']:.4f}", f"{t['compressed']:.4f}", f"{t['drop']:+.4f}")
            for name, t in tasks.items()]
    return ["Task accuracy (lm-eval, PyTorch models):",
            Table(("task", "metric", "n", "dense", "compressed", "drop"), rows)]


def _zero_shot_blocks(report: dict) -> list:
    z = report.get("zero_shot")
    if not z:
        return []
    sub, m = z["subset"], z["metric"]
    rows = [(name, r["scored"], str(r["n"]), f"{r['acc']:.4f} +/- {r['acc_se']:.4f}",
             f"{r['acc_norm']:.4f} +/- {r['acc_norm_se']:.4f}") for name, r in (("dense", z["dense"]),
                                                                             ("compressed", z["compressed"]))]
    rows.append(("retention", f"compressed / dense, {m}", str(sub["n"]), "", f"{z['retention']:.4f} +/- "
                 f"{z['retention_se']:.4f}"))
    text = (f"Zero-shot retention ({z['task']}): {sub['n']} items of `{Path(z['data']['path']).name}` "
            f"({z['data']['items_in_file']} in the file, sha256 {z['data']['sha256'][:12]}), chosen by a seeded "
            f"permutation (seed {sub['seed']}); both models scored the same items. Standard errors: "
            f"sqrt(p(1-p)/n), retention's paired (delta method).")
    if z.get("note"):
        text += " " + z["note"]
    return [text, Table(("model", "scored", "n", "acc +/- SE", "acc_norm +/- SE"), rows)]


def _projection_blocks(report: dict) -> list:
    pj = report.get("projection")
    if not pj:
        return []
    e = pj["efficiency"]
    rows = [(key, f"{pj['planner_ideal'][key]:.3f}", f"{pj['planner_calibrated'][key]:.3f}",
             f"{pj['measured_projected'][key]:.3f}", f"{pj['calibrated_error'][key]:+.1%}")
            for key in ("decode_tokens_per_s", "time_to_first_token_s")]
    return [f"Planner against profiler for the deployed artifact (efficiency on this host: decode "
            f"{e['decode']:.2f} of copy bandwidth, prefill {e['prefill']:.2f} of matmul peak; {e['source']}):",
            Table(("figure", "planner, ideal roofline", "planner, calibrated", "measured, projected",
                   "calibrated error"), rows)]


_CSS = """
*{box-sizing:border-box}
body{font-family:system-ui,sans-serif;line-height:1.4;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
div.table{max-width:100%;overflow-x:auto;margin:0.6em 0 1.2em}
table{border-collapse:collapse;max-width:100%;font-size:0.9em}
td,th{border:1px solid #ccc;padding:3px 7px;vertical-align:top;overflow-wrap:break-word}
th{background:#f3f3f3;text-align:left}
td{font-variant-numeric:tabular-nums}
img{max-width:100%;height:auto}
code{overflow-wrap:anywhere;background:#f6f6f6;padding:0 2px}
p{overflow-wrap:anywhere}
@media (max-width:700px){table{font-size:0.78em}td,th{padding:2px 4px}}
.PASS{color:#060;font-weight:bold}.FAIL{color:#a00;font-weight:bold}
"""


def _result_class(column: int, cell: str) -> str:
    return cell if cell in ("PASS", "FAIL") else ""


def _html(report: dict, plots: dict[str, str]) -> str:
    s = report["signoff"]
    imgs = "".join(f"<h2>{html.escape(k)}</h2><img alt='{html.escape(k)}' src='data:image/png;base64,{v}'>"
                   for k, v in plots.items())
    details = "".join(block.html(_result_class) if isinstance(block, Table) else f"<p>{_inline(block)}</p>"
                      for block in _details(report))
    return f"""<!doctype html><html><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>FuseDeploy sign-off</title>
<style>{_CSS}</style></head>
<body><h1>{html.escape(report['model'])} on {html.escape(report['profile']['name'])}:
<span class="{s['result']}">{s['result']}</span></h1>
<p>{_inline(f"Deployed artifact: `{s['artifact']}`; plan: sparsity {report['plan']['chosen']['sparsity']:g}, "
            f"{report['plan']['chosen']['quant']}.")}</p>
{_warning_html(s)}{_budget_table(s).html(_result_class)}
{imgs}
<h2>Details</h2>
{details}
<p>Every number is in report.json beside this file; report.md holds the same text as Markdown.</p></body></html>"""


def _warning_html(s: dict) -> str:
    flags = s.get("measurement", {}).get("warnings", [])
    if not flags:
        return ""
    return "<p class='FAIL'>Measurement warning: " + html.escape(" ".join(flags)) + "</p>"


def write_report(report: dict, folder: Path) -> dict:
    """Write the three files atomically; returns the sign-off."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"report.json": json.dumps(report, indent=2, default=str), "report.md": _markdown(report),
             "report.html": _html(report, _plots(report))}
    for name, text in files.items():
        tmp = folder / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, folder / name)
    return report["signoff"]
