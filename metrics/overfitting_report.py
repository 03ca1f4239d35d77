"""The overfitting metrics' report (``metrics/overfitting_comfy.overfitting_metrics``) as text, for the
Overfitting Metrics node and ``tools/evaluate.py overfitting``, and as strict JSON. Pure Python."""
from __future__ import annotations

import math

__all__ = ["format_report", "json_ready"]


def _table(header: list, rows: list) -> list[str]:
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]

    def line(r):
        return "| " + " | ".join(str(c).rjust(w) for c, w in zip(r, widths)) + " |"

    return [line(header), "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"] + [line(r) for r in rows]


def format_report(report: dict) -> str:
    """The report as text: LFD with its per-level table (σ, ε-MSE, weighted ε-MSE/σ²), then W2 with
    its two terms (or why it is NaN)."""
    d = report["lfd_details"]
    s = report["settings"]
    lines = [f"Latent Fisher divergence (concept-agnostic): LFD = {report['lfd']:.6g}",
             f"  {len(report['prompts_without'])} prompt(s) without the concept x {s['samples']} base-model "
             f"sample(s) x {s['levels']} level(s) x {s['draws']} noise draw(s) = {d['count']} records; "
             f"mean eps-MSE {d['eps_mse']:.6g}"]
    rows = [[str(r["level"] + 1), f"{r['sigma']:.4g}", f"{r['eps_mse']:.6g}", f"{r['lfd']:.6g}"]
            for r in d["per_level"]]
    lines += _table(["level", "sigma", "eps-MSE", "weighted (eps-MSE/sigma^2)"], rows)
    if len(d["per_prompt"]) > 1:
        lines.append("  per prompt: " + "; ".join(f"{r['lfd']:.4g} ({r.get('text', r['prompt'])})"
                                                   for r in d["per_prompt"]))
    lines.append("")
    w = report["w2_details"]
    if w is None:
        lines.append(f"Wasserstein-2 (concept-specific): W2 = NaN. {report['w2_note']}")
    else:
        lines += [f"Wasserstein-2 (concept-specific): W2 = {report['w2']:.6g}",
                  f"  W2^2 = {w['w2_squared']:.6g} = mean term {w['mean_term']:.6g} + covariance term "
                  f"{w['cov_term']:.6g}",
                  f"  {w['n_base']} base-model (class) vs {w['n_custom']} customised-model (concept) images of "
                  f"{len(report['prompts_with'])} prompt(s) with the concept; {w['features']}, {w['dim']}-d, "
                  f"L2-normalised; shrinkage rho {w['shrinkage_base']:.3g} (base) / {w['shrinkage_custom']:.3g} "
                  f"(customised)"]
    return "\n".join(lines) + "\n"


def json_ready(obj):
    """NaN and infinities as null (strict JSON)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_ready(v) for v in obj]
    return obj
