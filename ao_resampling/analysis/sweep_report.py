"""The sweep report: how each spread metric moves with the swept settings, paired by (target, question).

For each metric (judge score, embedding similarity, distinct fraction, the cluster judge's four numbers: pairwise
agreement, semantic entropy, number of meanings, modal share) and each condition: the mean over runs with a
bootstrap CI; for each pair of conditions: the mean of the *paired* differences over the (target, question) runs both
have, with its bootstrap CI (the conditions share targets and questions, so pairing removes their variance from the
comparison); which questions and targets move most between conditions. Figures: a line plot with CI bands along the
first varied setting (one line per value of a second one), and a heatmap when two settings vary.
Everything goes into ``sweep_summary.json`` and ``sweep_report.md`` under ``<sweep>/report``.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from ao_resampling.analysis.clusters import CLUSTER_METRICS, cluster_values
from ao_resampling.analysis.stats import (
    bootstrap_mean_ci, describe, embedding_similarities, judge_scores, lexical_values, rng_for,
)
from ao_resampling.analysis.figures import save_figure
from ao_resampling.analysis.plots import new_figure
from ao_resampling.results import Results
from ao_resampling.files import atomic_write_text

Key = tuple[str, str]  # (target_id, question_id): what pairs runs across conditions
METRICS: dict[str, tuple[str, Callable]] = {
    "judge_score": ("judge similarity score (1-10)", judge_scores),
    "embedding_similarity": ("mean pairwise cosine of answer embeddings", embedding_similarities),
    "distinct_fraction": ("fraction of distinct answers", lambda runs: lexical_values(runs, "distinct_fraction")),
    # the cluster judge's numbers (analysis/clusters.py); the default binds each metric's name in its lambda
    **{m: (label, lambda runs, m=m: cluster_values(runs, m)) for m, label in CLUSTER_METRICS.items()},
}
PANELS_PER_ROW = 4
TOP_MOVERS = 5


# ---------------------------------------------------------------------------------------------------------------------
# Statistics (pure)


def keyed_values(results: Results, metric: str) -> dict[Key, float]:
    """(target, question) -> the metric's value, for runs that have one (an unjudged run is no score)."""
    by_run = METRICS[metric][1](results.runs)
    return {(r.target_id, r.ao_question_id): float(by_run[r.run_id]) for r in results.runs if r.run_id in by_run}


def paired_difference(a: Mapping[Key, float], b: Mapping[Key, float], *, rng: np.random.Generator,
                      n_boot: int = 2000) -> dict[str, Any]:
    """Mean of ``b - a`` over the keys both have, its bootstrap CI, and how many keys only one side has."""
    shared = sorted(set(a) & set(b))
    diffs = [b[k] - a[k] for k in shared]
    ci = bootstrap_mean_ci(diffs, rng=rng, n_boot=n_boot)
    return {"n_pairs": len(shared), "mean_diff": float(np.mean(diffs)) if diffs else None,
            "ci95": list(ci) if ci else None, "n_only_first": len(set(a) - set(b)),
            "n_only_second": len(set(b) - set(a))}


def movers(values: Mapping[str, Mapping[Key, float]], by: str) -> list[dict[str, Any]]:
    """Per question (``by="question"``) or target: its mean in each condition over the keys every condition has,
    and the range of those means; largest range first."""
    conditions = list(values)
    shared = set.intersection(*(set(v) for v in values.values())) if values else set()
    at = 1 if by == "question" else 0
    groups = sorted({k[at] for k in shared})
    rows = []
    for g in groups:
        keys = [k for k in shared if k[at] == g]
        means = {c: float(np.mean([values[c][k] for k in keys])) for c in conditions}
        rows.append({"id": g, "n": len(keys), "means": means, "range": max(means.values()) - min(means.values())})
    return sorted(rows, key=lambda r: (-r["range"], r["id"]))


def metric_block(values: Mapping[str, Mapping[Key, float]], *, seed: int, n_boot: int, metric: str) -> dict[str, Any]:
    names = list(values)
    per_condition = {c: describe(list(v.values()), rng=rng_for(seed, f"{metric}/{c}"), n_boot=n_boot)
                     for c, v in values.items()}
    pairs = [dict(first=a, second=b, **paired_difference(values[a], values[b], n_boot=n_boot,
                                                          rng=rng_for(seed, f"{metric}/{a}/{b}")))
             for a, b in itertools.combinations(names, 2)]
    return {"per_condition": per_condition, "paired": pairs,
            "questions": movers(values, "question"), "targets": movers(values, "target")}


def summarize_sweep(manifest: Mapping[str, Any], results: Mapping[str, Results], *, seed: int = 0,
                    n_boot: int = 2000) -> dict[str, Any]:
    conditions = [c for c in manifest["conditions"]]
    present = [c["name"] for c in conditions if c["name"] in results]
    out: dict[str, Any] = {
        "varied": manifest.get("varied", []),
        "conditions": [{**c, "present": c["name"] in results,
                        "n_runs": len(results[c["name"]].runs) if c["name"] in results else 0} for c in conditions],
        "metrics": {},
    }
    stand_in = {bool(results[n].meta.stand_in) for n in present}
    out["stand_in"] = True in stand_in
    for metric in METRICS:
        values = {n: keyed_values(results[n], metric) for n in present}
        if any(values.values()):
            out["metrics"][metric] = metric_block(values, seed=seed, n_boot=n_boot, metric=metric)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Figures


def setting_of(condition: Mapping[str, Any], field: str, settings: Mapping[str, Any]) -> Any:
    return condition["overrides"].get(field, settings.get(field))


def _axis(values: Sequence[Any]) -> tuple[list[float], list[str] | None]:
    """Numeric settings on a numeric axis; rules (window:3 ...) at 0, 1, 2 with their names as tick labels."""
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], None
    return list(range(len(values))), [str(v) for v in values]


def _ordered(values: Sequence[Any]) -> list[Any]:
    return list(dict.fromkeys(json.dumps(v) for v in values))


def _panels(n: int, width: float, height: float) -> tuple[Figure, list]:
    """A figure with ``n`` panels, at most PANELS_PER_ROW to a row (seven metrics side by side would not read)."""
    cols = min(n, PANELS_PER_ROW)
    rows = -(-n // cols)
    fig = new_figure(width * cols, height * rows)
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n)]


def line_plot(summary: Mapping[str, Any], settings: Mapping[str, Any]) -> Figure:
    """Mean +- 95% CI band of each metric along the first varied setting; one line per value of the second."""
    x_field = summary["varied"][0]
    hue_field = summary["varied"][1] if len(summary["varied"]) > 1 else None
    metrics = list(summary["metrics"])
    fig, axes = _panels(len(metrics), 4.2, 3.6)
    conditions = [c for c in summary["conditions"] if c["present"]]
    xs_all = [json.loads(v) for v in _ordered([setting_of(c, x_field, settings) for c in conditions])]
    hues = [json.loads(v) for v in _ordered([setting_of(c, hue_field, settings) for c in conditions])] \
        if hue_field else [None]
    positions, labels = _axis(xs_all)
    for ax, metric in zip(axes, metrics):
        stats = summary["metrics"][metric]["per_condition"]
        for hue in hues:
            line = [(positions[xs_all.index(setting_of(c, x_field, settings))], stats.get(c["name"]))
                    for c in conditions if hue_field is None or setting_of(c, hue_field, settings) == hue]
            line = sorted((x, s) for x, s in line if s and s["mean"] is not None)
            if not line:
                continue
            x = [p for p, _ in line]
            ax.plot(x, [s["mean"] for _, s in line], marker="o", label=f"{hue_field}={hue}" if hue_field else None)
            ax.fill_between(x, [s["ci95"][0] for _, s in line], [s["ci95"][1] for _, s in line], alpha=0.2)
        if labels:
            ax.set_xticks(positions, labels)
        ax.set_xlabel(x_field)
        ax.set_ylabel(METRICS[metric][0], fontsize=8)
        ax.set_title(metric, fontsize=9)
        if hue_field:
            ax.legend(fontsize=7)
    fig.suptitle("sweep: mean per condition, 95% bootstrap CI band" + (" (STAND-IN model)" if summary["stand_in"]
                                                                         else ""), fontsize=10)
    return fig


def heatmap(summary: Mapping[str, Any], settings: Mapping[str, Any]) -> Figure:
    """Mean of each metric over the grid of the two varied settings (first across, second down)."""
    x_field, y_field = summary["varied"][:2]
    conditions = [c for c in summary["conditions"] if c["present"]]
    xs = [json.loads(v) for v in _ordered([setting_of(c, x_field, settings) for c in conditions])]
    ys = [json.loads(v) for v in _ordered([setting_of(c, y_field, settings) for c in conditions])]
    metrics = list(summary["metrics"])
    fig, axes = _panels(len(metrics), 4.2, 3.4)
    for ax, metric in zip(axes, metrics):
        grid_YX = np.full((len(ys), len(xs)), np.nan)
        stats = summary["metrics"][metric]["per_condition"]
        for c in conditions:
            s = stats.get(c["name"])
            if s and s["mean"] is not None:
                row, col = ys.index(setting_of(c, y_field, settings)), xs.index(setting_of(c, x_field, settings))
                grid_YX[row, col] = s["mean"]
        image = ax.imshow(grid_YX, cmap="viridis", aspect="auto")
        for (r, k), v in np.ndenumerate(grid_YX):
            if not np.isnan(v):  # dark text on viridis' bright (upper) half, white on its dark half
                bright = image.norm(v) > 0.6
                ax.text(k, r, f"{v:.2f}", ha="center", va="center", fontsize=8, color="black" if bright else "white")
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_yticks(range(len(ys)), [str(y) for y in ys])
        ax.set_xlabel(x_field)
        ax.set_ylabel(y_field)
        ax.set_title(metric, fontsize=9)
        fig.colorbar(image, ax=ax, shrink=0.8)
    fig.suptitle("sweep: mean per condition" + (" (STAND-IN model)" if summary["stand_in"] else ""), fontsize=10)
    return fig


# ---------------------------------------------------------------------------------------------------------------------
# Markdown and files


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _ci(ci: Sequence[float] | None) -> str:
    return "n/a" if not ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def metric_markdown(metric: str, block: Mapping[str, Any]) -> list[str]:
    lines = [f"## {metric}: {METRICS[metric][0]}", "", "| condition | n | mean | 95% CI |", "|---|---:|---:|---:|"]
    for name, s in block["per_condition"].items():
        lines.append(f"| {name} | {s['n']} | {_fmt(s['mean'])} | {_ci(s.get('ci95'))} |")
    lines += ["", "Paired by (target, question): mean of second - first over the runs both have.", "",
              "| first | second | pairs | mean difference | 95% CI |", "|---|---|---:|---:|---:|"]
    for p in block["paired"]:
        lines.append(f"| {p['first']} | {p['second']} | {p['n_pairs']} | {_fmt(p['mean_diff'])} | {_ci(p['ci95'])} |")
    for by in ("questions", "targets"):
        top = block[by][:TOP_MOVERS]
        lines += ["", f"{by.capitalize()} that move most (range of their means across conditions): "
                  + (", ".join(f"{r['id']} ({r['range']:.3f})" for r in top) or "none")]
    return lines + [""]


def render_markdown(summary: Mapping[str, Any], figures: Sequence[str]) -> str:
    lines = ["# Sweep report", ""]
    if summary["stand_in"]:
        lines += ["**STAND-IN**: random weights or a random LoRA; these numbers say nothing about the real oracle.", ""]
    lines += [f"Varied: {', '.join(summary['varied']) or 'nothing'}.", "", "| condition | folder | runs |",
              "|---|---|---:|"]
    lines += [f"| {c['name']} | {c['folder']} | {c['n_runs'] if c['present'] else 'missing'} |"
              for c in summary["conditions"]]
    lines += [""] + [f"![{f}]({f})" for f in figures] + [""]
    for metric, block in summary["metrics"].items():
        lines += metric_markdown(metric, block)
    return "\n".join(lines)


def write_sweep_report(out_dir: Path, manifest: Mapping[str, Any], results: Mapping[str, Results], *, seed: int = 0,
                       n_boot: int = 2000, dpi: int = 120) -> Path:
    """``sweep_summary.json``, ``sweep_report.md`` and the figures, under ``<sweep>/report``.

    ``manifest`` and ``results`` (condition name -> its results) as ``sweep.run_sweep`` holds them: the
    sweep folder's layout is the pipeline's business, the numbers this module's.
    """
    summary = summarize_sweep(manifest, results, seed=seed, n_boot=n_boot)
    report_dir = Path(out_dir) / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    figures = {}
    if summary["varied"] and summary["metrics"]:
        figures["sweep_lines.png"] = line_plot(summary, manifest.get("settings", {}))
        if len(summary["varied"]) == 2:
            figures["sweep_heatmap.png"] = heatmap(summary, manifest.get("settings", {}))
    for name, fig in figures.items():
        save_figure(fig, report_dir / name, dpi=dpi)
    atomic_write_text(report_dir / "sweep_summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(report_dir / "sweep_report.md", render_markdown(summary, list(figures)))
    return report_dir
