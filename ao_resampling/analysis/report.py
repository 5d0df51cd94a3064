"""report.md and the PNG figures from one results file (its numbers come from summary.py's ``summarize``).

``report.md`` is a list of section functions, each ``(ReportContext) -> markdown or None``; the figures are a list of
providers, each ``results -> {file name: plot function}`` (figures.py). A later analysis (the target-model baseline,
say) adds one function to each list (and one to summary.py's) without touching the others. A run whose judge call failed, or that
is not judged yet, is never a score; the report says how many. ``write_report`` writes all three kinds of file.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ao_resampling.analysis.cluster_report import clusters_markdown
from ao_resampling.analysis.figures import FIGURE_NAMES, JUDGE_VS_EMBEDDING, PLOT_SETS, save_figure
from ao_resampling.analysis.stats import embedding_similarities, judge_counts, judge_scores
from ao_resampling.analysis.summary import summarize, target_text
from ao_resampling.results import Baseline, Results, Run
from ao_resampling.files import atomic_write_text

SUMMARY_NAME = "summary.json"
REPORT_NAME = "report.md"


# ---------------------------------------------------------------------------------------------------------------------
# report.md


@dataclass(frozen=True)
class ReportContext:
    results: Results
    summary: dict[str, Any]
    plots: dict[str, str]  # file name -> link relative to report.md, for the figures that were written


ReportSection = Callable[[ReportContext], str | None]


def _num(x: float | None, fmt: str = ".2f") -> str:
    return "–" if x is None else format(x, fmt)


def _ci(ci: Sequence[float] | None, fmt: str = ".2f") -> str:
    return "–" if ci is None else f"[{ci[0]:{fmt}}, {ci[1]:{fmt}}]"


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell or list item: one line, pipes escaped."""
    return " ".join(text.split()).replace("|", "\\|")


def _image(ctx: ReportContext, name: str, alt: str) -> str:
    return f"![{alt}]({ctx.plots[name]})" if name in ctx.plots else ""


def header_section(ctx: ReportContext) -> str:
    s, meta = ctx.summary, ctx.results.meta
    lines = ["# Activation Oracle resampling report", ""]
    if meta.stand_in:
        lines += ["> **Stand-in run:** the model has random weights or the oracle is a random LoRA. These numbers",
                  "> test the plumbing and say nothing about a real Activation Oracle.", ""]
    if s["n_unjudged"]:
        lines.append(f"- **Incomplete:** {s['n_unjudged']} of {s['n_runs']} runs are not judged yet (unjudged); "
                     f"every judge statistic below is over the {s['n_judged']} judged runs only.")
    if s["n_without_answers"]:
        lines.append(f"- {s['n_without_answers']} runs have no AO answers yet.")
    if s["n_judge_failures"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in s["judge_failures"].items())
        lines.append(f"- **Judge failures:** {s['n_judge_failures']} judge calls failed ({reasons}); those runs are "
                     f"left out of every score (a failure is not a low score).")
    if not s["n_runs"]:
        lines.append("- **Empty:** this file holds no runs, so there is nothing to judge or report yet.")
    elif not s["n_unjudged"] and not s["n_judge_failures"]:
        lines.append(f"All {s['n_runs']} runs are judged.")
    return "\n".join(lines)


def setup_section(ctx: ReportContext) -> str:
    results, meta = ctx.results, ctx.results.meta
    decoding = meta.decoding or next((r.responses[0].decoding for r in results.runs if r.responses), None)
    judge_model = meta.judge_model or next((r.judge.model for r in results.runs if r.judge), None)
    n_answers = sorted({len(r.responses) for r in results.runs if r.responses})
    answers = "–" if not n_answers else str(n_answers[0]) if len(n_answers) == 1 else f"{n_answers[0]}–{n_answers[-1]}"
    rows = [
        ("model", meta.model), ("tokenizer", meta.tokenizer), ("oracle LoRA", meta.oracle_lora),
        ("layers in the model", meta.num_layers), ("activations read at layer", meta.layer),
        ("injection layer", meta.injection_layer), ("steering coefficient", meta.steering_coefficient),
        ("decoding", None if decoding is None else
         f"temperature {decoding.temperature}, top_p {decoding.top_p}, max_new_tokens {decoding.max_new_tokens}, "
         f"{'sampling' if decoding.do_sample else 'greedy'}"),
        ("question seed", meta.question_seed), ("decode seed", meta.decode_seed), ("judge model", judge_model),
        ("embedding model", ctx.summary.get("embedding", {}).get("model")),
        ("runs", f"{len(results.targets)} targets × {len(results.ao_questions)} questions = {len(results.runs)} runs, "
                 f"{answers} answers each"),
        ("tool version", meta.tool_version), ("git commit", meta.git_commit), ("created", meta.created_at),
        ("note", meta.note),
    ]
    for key, value in (meta.model_extra or {}).items():  # keys of older formats, shown as they were
        text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
        rows.append((key, text if len(text) <= 120 else text[:119] + "…"))
    table = ["| setting | value |", "| --- | --- |"]
    table += [f"| {k} | {_cell(str(v))} |" for k, v in rows if v is not None]
    return "## Setup\n\n" + "\n".join(table)


def judge_distribution_section(ctx: ReportContext) -> str:
    judge, n = ctx.summary["judge"], ctx.summary["n_judged"]
    if n == 0:  # an empty score table says nothing; point at the judge-free view and how to judge
        return ("## Judge score distribution\n\n"
                f"{judge_counts(ctx.results.runs).note()}: no LLM judge score yet (`ao-resampling judge RUN_FOLDER` "
                "adds them, with OPENAI_API_KEY or a judge base URL). The judge-free view below has the embedding "
                "and lexical spread of every run.")
    lines = ["## Judge score distribution", "",
             f"{judge_counts(ctx.results.runs).note()}. Mean {_num(judge['mean'])} (95% bootstrap CI "
             f"{_ci(judge['mean_ci95'])}), median {_num(judge['median'], 'g')}, std {_num(judge['std'])}, "
             f"range {_num(judge['min'], 'g')}–{_num(judge['max'], 'g')}.", "",
             "| score | runs | share |", "| ---: | ---: | ---: |"]
    lines += [f"| {k} | {c} | {c / n:.1%} |" if n else f"| {k} | {c} | – |" for k, c in judge["histogram"].items()]
    lines += ["", _image(ctx, "A_judge_scores.png", "A: judge scores"),
              _image(ctx, "B_target_means.png", "B: per-target mean score"),
              "", _image(ctx, "C_per_question.png", "C: per-question scores"),
              "", _image(ctx, "heatmap.png", "target x question heatmap")]
    return "\n".join(lines)


def per_question_section(ctx: ReportContext) -> str:
    per_q = ctx.summary["per_question"]
    emb = ctx.summary.get("embedding", {}).get("per_question", {})
    order = sorted(per_q, key=lambda k: (per_q[k]["mean"] is None, -(per_q[k]["mean"] or 0.0), k))
    head = "| # | id | question | n | mean | 95% CI | median | min–max |" + (" embedding mean |" if emb else "")
    lines = ["## Per question (sorted by mean judge score)", "", head,
             "| ---: | --- | --- | ---: | ---: | --- | ---: | --- |" + (" ---: |" if emb else "")]
    for rank, key in enumerate(order, start=1):
        q = per_q[key]
        row = (f"| {rank} | {key} | {_cell(q['text'])} | {q['n']} | {_num(q['mean'])} | {_ci(q['ci95'])} | "
               f"{_num(q['median'], 'g')} | {_num(q['min'], 'g')}–{_num(q['max'], 'g')} |")
        if emb:
            row += f" {_num(emb.get(key, {}).get('mean'), '.3f')} |"
        lines.append(row)
    return "\n".join(lines)


def per_target_section(ctx: ReportContext) -> str:
    per_t = {k: v for k, v in ctx.summary["per_target"].items() if v["mean"] is not None}
    order = sorted(per_t, key=lambda k: (-per_t[k]["mean"], k))

    def table(keys: list[str]) -> list[str]:
        out = ["| target | n | mean | 95% CI | min–max | conversation (first user turn) |",
               "| --- | ---: | ---: | --- | --- | --- |"]
        return out + [f"| {k} | {per_t[k]['n']} | {_num(per_t[k]['mean'])} | {_ci(per_t[k]['ci95'])} | "
                      f"{_num(per_t[k]['min'], 'g')}–{_num(per_t[k]['max'], 'g')} | {_cell(per_t[k]['text'])} |"
                      for k in keys]

    lines = ["## Per target", ""]
    if not order:
        return "\n".join(lines + ["No target has a judged run yet."])
    if len(order) <= 10:
        return "\n".join(lines + ["All targets, by mean judge score over their questions:", ""] + table(order))
    return "\n".join(lines + ["Highest mean judge score (most consistent oracle):", ""] + table(order[:5])
                     + ["", "Lowest mean judge score (least consistent oracle):", ""] + table(order[::-1][:5]))


def _example(ctx: ReportContext, run: Run, score: int | None, sim: float | None) -> list[str]:
    questions = {q.id: q.text for q in ctx.results.ao_questions}
    targets = {t.id: t for t in ctx.results.targets}
    title = f"score {score}/10" if score is not None else "no judge score"
    if sim is not None:
        title += f", embedding similarity {sim:.3f}"
    lines = [f"#### {run.run_id} ({title})", "",
             f"- **Target** {run.target_id}: {_cell(target_text(targets[run.target_id], width=200))}",
             f"- **Question** {run.ao_question_id}: {_cell(questions[run.ao_question_id])}"]
    if run.judge is not None and run.judge.parsed is not None:
        lines.append(f"- **Judge's rationale:** {_cell(run.judge.parsed.rationale)}")
    lines += ["- **Answers:**", ""] + [f"  {i}. {_cell(r.text) or '(empty)'}" for i, r in enumerate(run.responses, 1)]
    return lines + [""]


def consistency_section(ctx: ReportContext) -> str:
    runs = ctx.results.run_by_id()
    scores, sims = judge_scores(ctx.results.runs), embedding_similarities(ctx.results.runs)
    lines = ["## Most and least consistent runs", ""]
    if scores:
        ranked = sorted(scores, key=lambda rid: (scores[rid], sims.get(rid, 0.0), rid))
        lines += ["Ranked by judge score (ties by embedding similarity); judged runs only.", ""]
    elif sims:
        ranked = sorted(sims, key=lambda rid: (sims[rid], rid))
        lines += ["No run is judged yet, so these are ranked by embedding similarity.", ""]
    else:
        return "\n".join(lines + ["No run has a judge score or an embedding similarity yet."])
    for heading, ids in (("Most consistent", ranked[::-1][:3]), ("Least consistent", ranked[:3])):
        lines += [f"### {heading}", ""]
        for rid in ids:
            lines += _example(ctx, runs[rid], scores.get(rid), sims.get(rid))
    return "\n".join(lines).rstrip()


def judge_free_section(ctx: ReportContext) -> str:
    lines = ["## Judge-free view: embedding similarity", ""]
    emb = ctx.summary.get("embedding")
    if emb is None:
        return "\n".join(lines + ["Skipped: no run has spread metrics yet, so there is no embedding or lexical "
                                  "view (compute them with the spread stage, `stages.spread.spread_stage`)."])
    agreement, lexical = ctx.summary["agreement"], ctx.summary.get("lexical", {})
    lines += [f"Mean pairwise cosine similarity of each run's answers ({emb['model']}): n={emb['n']} runs, "
              f"mean {_num(emb['mean'], '.3f')} (95% CI {_ci(emb['mean_ci95'], '.3f')}), median "
              f"{_num(emb['median'], '.3f')}, range {_num(emb['min'], '.3f')}–{_num(emb['max'], '.3f')}.", ""]
    if lexical:
        d, j = lexical["distinct_fraction"], lexical["mean_jaccard"]
        lines += [f"Lexical: distinct normalised answers per run {_num(d['mean'], '.3f')} on average (1.0 = all "
                  f"different); mean pairwise token Jaccard {_num(j['mean'], '.3f')}.", ""]
    rho = agreement["spearman"]
    lines += [f"Judge vs embedding: Spearman ρ = {_num(rho, '.3f')} (p = {_num(agreement['spearman_p'], '.2g')}) "
              f"over {agreement['n']} runs with both." if rho is not None else
              f"Judge vs embedding: no rank correlation ({agreement['n']} runs with both).", "",
              _image(ctx, "A_embedding.png", "A: embedding similarity"),
              _image(ctx, "B_embedding_target_means.png", "B: per-target mean embedding similarity"), "",
              _image(ctx, "C_embedding_per_question.png", "C: per-question embedding similarity"), "",
              _image(ctx, JUDGE_VS_EMBEDDING, "judge score vs embedding similarity") if JUDGE_VS_EMBEDDING in ctx.plots
              else "No judge-vs-embedding figure: no run has both a judge score and an embedding similarity yet "
                   "(`ao-resampling judge RUN_FOLDER` adds the scores)."]
    return "\n".join(lines)


def judge_repeats_md_section(ctx: ReportContext) -> str | None:
    rep = ctx.summary.get("judge_repeats")
    if rep is None:
        return None
    return ("## Judge repeats\n\n"
            f"{rep['n_pairs']} repeated judge calls (answers shuffled) paired with the first call: exact agreement "
            f"{_num(rep['exact_agreement_rate'], '.1%')}, mean absolute difference {_num(rep['mean_abs_delta'])} points.")


def _ids(ids: Sequence[str], most: int = 20) -> str:
    shown = ", ".join(ids[:most])
    return shown + (f" … and {len(ids) - most} more" if len(ids) > most else "")


def _baseline_view(ctx: ReportContext, block: dict[str, Any], *, what: str, fmt: str, image: str) -> list[str]:
    if not block["n_targets"]:
        return [f"No target has both an AO {what} and a baseline {what} yet."]
    r = ("Pearson r = n/a" if block["pearson_r"] is None else
         f"Pearson r = {block['pearson_r']:.3f} (p = {block['pearson_p']:.2g})")
    rho = ("Spearman ρ = n/a" if block["spearman_r"] is None else
           f"Spearman ρ = {block['spearman_r']:.3f} (p = {block['spearman_p']:.2g})")
    return [f"Over the {block['n_targets']} targets with both: the target model's own {what} averages "
            f"{_num(block['mean'], fmt)}, the AO's mean {what} {_num(block['ao_mean'], fmt)}; {r}, {rho}.", "",
            _image(ctx, image, f"AO vs target model ({what})")]


def _gap_tables(ctx: ReportContext, block: dict[str, Any], fmt: str) -> list[str]:
    texts = {t.id: target_text(t) for t in ctx.results.targets}
    lines = []
    for key, heading in (("ao_higher", "AO more self-consistent than the target model (AO − target > 0)"),
                         ("baseline_higher", "Target model more self-consistent than the AO (AO − target < 0)")):
        rows = block["largest_gaps"][key]
        lines += [f"{heading}:", ""]
        if not rows:
            lines += ["None.", ""]
            continue
        lines += ["| target | AO mean | target model | gap | conversation (first user turn) |",
                  "| --- | ---: | ---: | ---: | --- |"]
        lines += [f"| {g['target_id']} | {_num(g['ao_mean'], fmt)} | {_num(g['baseline'], fmt)} | "
                  f"{g['gap']:+{fmt}} | {_cell(texts.get(g['target_id'], '(not in the AO results)'))} |" for g in rows]
        lines.append("")
    return lines


def baseline_md_section(ctx: ReportContext) -> str | None:
    b = ctx.summary.get("baseline")
    if b is None:
        return None
    lines = ["## Target-model baseline", "",
             "Does the oracle's spread just mirror the target model's own variability on the prompt? The target "
             "model itself (adapter off, nothing injected) continued each target's conversation several times and "
             "the judge rated how similar its replies are, on the same 1–10 scale.", ""]
    decoding, n = b["decoding"], b["responses_per_target"]
    replies = "no" if not n else str(n[0]) if len(n) == 1 else f"{n[0]}–{n[-1]}"
    lines.append(f"- {b['n_runs']} baseline targets, {replies} replies each"
                 + ("" if decoding is None else f" (temperature {decoding['temperature']}, top_p {decoding['top_p']}, "
                                                f"max_new_tokens {decoding['max_new_tokens']})") + ".")
    if b["n_judge_failures"]:
        reasons = ", ".join(f"{k}: {v}" for k, v in b["judge_failures"].items())
        lines.append(f"- **Baseline judge failures:** {b['n_judge_failures']} ({reasons}); those targets are left out "
                     "(a failure is not a low score).")
    if b["n_unjudged"]:
        lines.append(f"- {b['n_unjudged']} baseline targets are not judged yet.")
    if b["only_in_results"]:
        lines.append(f"- **No baseline for {len(b['only_in_results'])} target(s) of the AO results:** "
                     f"{_ids(b['only_in_results'])}.")
    if b["only_in_baseline"]:
        lines.append(f"- **{len(b['only_in_baseline'])} baseline target(s) have no AO runs:** "
                     f"{_ids(b['only_in_baseline'])}.")
    lines += ["", "### Judge view", ""]
    lines += _baseline_view(ctx, b, what="judge similarity", fmt=".2f", image="baseline_vs_ao.png")
    emb = b["embedding"]
    lines += ["", "### Embedding view", ""]
    if emb["skipped"]:
        lines.append(f"Skipped: {emb['skipped']}.")
    else:
        lines += [f"Mean pairwise cosine similarity of the replies, embedded with {emb['model']} (as the AO runs "
                  "were).", ""]
        lines += _baseline_view(ctx, emb, what="embedding similarity", fmt=".3f", image="baseline_vs_ao_embedding.png")
    lines += ["", "### Largest gaps", ""]
    if b["n_targets"]:
        lines += ["By judge score (the AO's mean over the target's questions against the target model's own):", ""]
        lines += _gap_tables(ctx, b, ".2f")
    elif emb["n_targets"]:
        lines += ["By embedding similarity (no target has both judge scores):", ""]
        lines += _gap_tables(ctx, emb, ".3f")
    else:
        lines.append("No target has both an AO value and a baseline value yet.")
    return "\n".join(lines).rstrip()


def clusters_md_section(ctx: ReportContext) -> str | None:
    return clusters_markdown(ctx.summary, ctx.results, ctx.plots)


REPORT_SECTIONS: list[ReportSection] = [
    header_section, setup_section, judge_distribution_section, per_question_section, per_target_section,
    clusters_md_section, consistency_section, judge_free_section, judge_repeats_md_section, baseline_md_section,
]


def render_report(ctx: ReportContext, sections: Sequence[ReportSection] | None = None) -> str:
    parts = [section(ctx) for section in (REPORT_SECTIONS if sections is None else sections)]
    return "\n\n".join(p for p in parts if p) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class ReportPaths:
    out_dir: Path
    report_md: Path
    summary_json: Path
    plots: dict[str, Path] = field(default_factory=dict)


def write_report(results: Results, out_dir: Path, *, seed: int = 0, n_boot: int = 2000, dpi: int = 150,
                 baseline: Baseline | None = None) -> ReportPaths:
    """Write every figure that applies, summary.json and report.md into ``out_dir``.

    ``baseline``: a target-model baseline saved on its own; it stands in for the file's own for this report.
    """
    if baseline is not None:
        results = results.model_copy(update={"baseline": baseline})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    for plot_set in PLOT_SETS:
        for name, make in plot_set(results).items():
            save_figure(make(results), out_dir / name, dpi=dpi)
            written[name] = out_dir / name
    for stale in FIGURE_NAMES - set(written):  # an earlier report's figure beside this one would read as its own
        (out_dir / stale).unlink(missing_ok=True)
    summary = summarize(results, seed=seed, n_boot=n_boot)
    summary_path, report_path = out_dir / SUMMARY_NAME, out_dir / REPORT_NAME
    atomic_write_text(summary_path, json.dumps(summary, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    ctx = ReportContext(results=results, summary=summary, plots={name: name for name in written})
    atomic_write_text(report_path, render_report(ctx))
    return ReportPaths(out_dir=out_dir, report_md=report_path, summary_json=summary_path, plots=written)
