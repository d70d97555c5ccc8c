"""Markdown tables of budget searches (for READMEs and notebooks).

:func:`budget_table` puts one row per budget (the sweet spot beside the best dense model);
:func:`published_table` puts the published models on one result's cost axes. Both read
:class:`moe_scaling.design.search.SearchResult` s; numbers are formatted with
:mod:`moe_scaling.units`.
"""

from __future__ import annotations

from typing import Sequence

from moe_scaling.design.search import SearchResult
from moe_scaling.units import format_count

__all__ = ["budget_table", "published_table"]


def budget_table(results: Sequence[SearchResult]) -> str:
    """A Markdown table: one row per budget, the sweet spot beside the best dense model."""
    head = ("| budget | sweet spot (d x layers, experts top-k + shared) | active / total | E | bytes | "
            "GFLOPs/token | predicted loss | binds | best dense (d x layers) | dense active | dense loss |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|")
    rows = [head]
    for r in results:
        s, d = r.sweet_spot, r.dense
        if s is None:
            rows.append(f"| {r.budget.memory / 1e9:g} GB | nothing fits | | | | | | | | | |")
            continue
        arch = (f"{s['d_model']} x {s['n_layers']}, {s['n_experts']} x {s['d_expert']} top-{s['top_k']}"
                f"{' + ' + str(s['n_shared']) + ' x ' + str(s['d_shared']) if s['n_shared'] else ''}"
                if s["n_experts"] > 1 else f"{s['d_model']} x {s['n_layers']} dense")
        iv = s["predicted_loss_interval"]
        loss = f"{s['predicted_loss']:.4f}" + (f" [{iv[0]:.4f}, {iv[1]:.4f}]" if iv else "")
        dense = (f"{d['d_model']} x {d['n_layers']}", format_count(d["params_active"]),
                 f"{d['predicted_loss']:.4f}") if d else ("-", "-", "-")
        rows.append(f"| {r.budget.memory / 1e9:g} GB | {arch} | {format_count(s['params_active'])} / "
                    f"{format_count(s['params_total'])} | {s['expansion']:g} | {s['total_bytes'] / 1e9:.2f} GB | "
                    f"{s['flops_per_token_forward'] / 1e9:.2f} | {loss} | {', '.join(r.binding)} | "
                    f"{dense[0]} | {dense[1]} | {dense[2]} |")
    return "\n".join(rows)


def published_table(result: SearchResult) -> str:
    """A Markdown table of the published models on the result's cost axes."""
    b = result.budget
    ms = b.device is not None
    rows = [f"| model | active / total | E | bytes ({b.weights}, KV {b.kv} @ {b.context}) | GFLOPs/token |"
            + (f" decode ms/token ({b.device}) |" if ms else "") + " tokens | predicted loss |",
            "|---|---|---|---|---|" + ("---|" if ms else "") + "---|---|"]
    for p in result.published:
        rows.append(f"| {p['name']} | {format_count(p['params_active'])} / {format_count(p['params_total'])} | {p['expansion']:g} | "
                    f"{p['total_bytes'] / 1e9:.2f} GB | {p['flops_per_token_forward'] / 1e9:.2f} |"
                    + (f" {p['decode_ms_per_token']:.1f} |" if ms else "")
                    + f" {p['tokens']:.3g} | {p['predicted_loss']:.4f} |")
    return "\n".join(rows)
