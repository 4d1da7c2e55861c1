"""Prefect artifacts of the flow runs: what a run made, dropped, gained, shown in the UI's Artifacts tab.

Two halves. The pure half turns a flow's own tables and summary into table rows and markdown
(``generation_rows``, ``funnel_rows``, ``drop_rows``, ``eval_dim_rows`` …): plain functions, tested
without Prefect. The publishing half (``publish_*``, ``GenerateProgress``) hands them to Prefect's
artifact API under stable keys (:data:`KEYS`), so the UI's Artifacts page keeps each key's history
across runs. Outside a flow or task run the publishing calls do nothing; an API error is logged as a
warning and never fails the run that reports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from storage.catalog import Catalog
from storage.funnel import GENERATED, drop_reasons, funnel_counts, generator_funnel
from storage.shards import RunStore, ShardRecord
from storage.summaries import EvalDelta, Evaluation, FinetuneSummary
from tasks.training.heldout_loss import describe_heldout_loss

if TYPE_CHECKING:  # the flows that publish these import this module
    from flows.clean import CleanSummary
    from flows.generate import GenerateSummary

#: one stable key per artifact (lowercase letters, digits, dashes: Prefect's rule)
KEYS = {
    "generate_progress": "generate-progress",
    "generate_task_types": "generate-task-types",
    "generate_llm_endpoints": "generate-llm-endpoints",
    "clean_funnel": "clean-funnel",
    "clean_generators": "clean-generators",
    "clean_drop_reasons": "clean-drop-reasons",
    "clean_samples": "clean-samples",
    "clean_report": "clean-report",
    "clean_export": "clean-export",
    "finetune_dims": "finetune-eval-dims",
    "finetune_languages": "finetune-eval-languages",
    "finetune_training": "finetune-training",
    "finetune_model": "finetune-model",
    "pipeline_summary": "pipeline-summary",
}
SAMPLES_PER_TYPE = 3
TEXT_CHARS = 160  # texts in the sample table are cut to this length


# --- pure: summaries and tables -> rows and markdown ---------------------------------------------
def short(text: str | None, limit: int = TEXT_CHARS) -> str | None:
    if text is None or len(text) <= limit:
        return text
    return text[: limit - 1].rstrip() + "…"


def as_link(location: str) -> str:
    """A URL for a stored file or folder: S3 (or any) URLs as they are, local paths as ``file://``."""
    return location if "://" in location else Path(location).resolve().as_uri()


def _reasons(reasons: list[str]) -> str:
    counts: dict[str, int] = {}
    for reason in reasons:
        counts[reason] = counts.get(reason, 0) + 1
    return "; ".join(f"{r} ×{n}" for r, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


#: the columns :func:`generation_rows` reads of a run's examples and rejects (read only these: no texts)
GENERATION_COLUMNS = {
    "examples": ("task_type", "latency_s", "completion_tokens", "prompt_tokens", "attempts"),
    "rejects": ("stage", "task_type", "attempts", "reason"),
}


def _generation_row(task_type: str, examples: pa.Table, rejects: pa.Table) -> dict[str, Any]:
    latency = examples["latency_s"].to_numpy(zero_copy_only=False).astype(float)
    completion = int(pc.sum(examples["completion_tokens"]).as_py() or 0)
    seconds = float(latency.sum())
    attempts = int(pc.sum(examples["attempts"]).as_py() or 0) + int(pc.sum(rejects["attempts"]).as_py() or 0)
    return {
        "task type": task_type,
        "requests": examples.num_rows + rejects.num_rows,
        "examples": examples.num_rows,
        "rejects": rejects.num_rows,
        "rejects by reason": _reasons(rejects["reason"].to_pylist()) or "none",
        "attempts": attempts,
        "prompt tokens": int(pc.sum(examples["prompt_tokens"]).as_py() or 0),
        "completion tokens": completion,
        "tokens/s per request": round(completion / seconds, 1) if seconds else None,
        "latency p50 s": round(float(np.percentile(latency, 50)), 3) if len(latency) else None,
        "latency p95 s": round(float(np.percentile(latency, 95)), 3) if len(latency) else None,
    }


def generation_rows(examples: pa.Table, rejects: pa.Table) -> list[dict[str, Any]]:
    """One row per task type (and a total) from a run's example and reject tables.

    Requests are examples plus rejects of the ``generate`` stage (brainstorm rejects have no example
    to count against); tokens and latency come from the examples (a reject records no usage);
    tokens/s per request is completion tokens over the summed request latency.
    """
    rejects = rejects.filter(pc.equal(rejects["stage"], "generate")) if rejects.num_rows else rejects
    types = sorted(set(examples["task_type"].to_pylist()) | set(rejects["task_type"].to_pylist()))
    rows = [
        _generation_row(
            t,
            examples.filter(pc.equal(examples["task_type"], t)),
            rejects.filter(pc.equal(rejects["task_type"], t)) if rejects.num_rows else rejects,
        )
        for t in types
    ]
    if len(rows) > 1:
        rows.append(_generation_row("total", examples, rejects))
    return rows


def funnel_rows(per_stage: Mapping[str, Mapping[str, int]], label: str = "task type") -> list[dict[str, Any]]:
    """``{stage: {task_type: rows}}`` (``storage.funnel.funnel_counts``, columns in its order) → one row per
    task type (or generator: ``label``) with a column per stage, then a total row; kept % is the last column
    over the first."""
    stages = list(per_stage)
    types = sorted({t for counts in per_stage.values() for t in counts})
    rows = []
    for name in [*types, "total"]:
        counts = {s: (sum(per_stage[s].values()) if name == "total" else per_stage[s].get(name, 0)) for s in stages}
        first, last = counts[stages[0]], counts[stages[-1]]
        kept = round(100.0 * last / first, 1) if first else None
        rows.append({label: name, **counts, "kept %": kept})
    return rows


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_none_\n"
    head = list(rows[0])
    cell = lambda v: "" if v is None else str(v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in head) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def eval_dim_rows(before: Evaluation, after: Evaluation, delta: EvalDelta) -> list[dict]:
    """Per Matryoshka dim: mean STS Spearman and held-out nDCG@10 / recall@10, before, after and delta."""
    rows: dict[str, dict[str, Any]] = {}
    sts_delta = (delta.sts or {}).get("mean", {})
    for dim, value in after.sts_mean.items():
        rows.setdefault(dim, {"dim": int(dim)}).update(
            {
                "sts spearman before": before.sts_mean.get(dim),
                "sts spearman after": value,
                "sts delta": sts_delta.get(dim),
            }
        )
    if after.retrieval:
        before_metrics = before.retrieval.metrics if before.retrieval else {}
        for dim, after_m in after.retrieval.metrics.items():
            change = (delta.retrieval or {}).get(dim, {})
            row = rows.setdefault(dim, {"dim": int(dim)})
            for metric in ("ndcg@10", "recall@10"):
                row[f"{metric} before"] = before_metrics.get(dim, {}).get(metric)
                row[f"{metric} after"] = after_m.get(metric)
                row[f"{metric} delta"] = change.get(metric)
    return [_rounded(rows[d]) for d in sorted(rows, key=int, reverse=True)]


def eval_language_rows(before: Evaluation, after: Evaluation, delta: EvalDelta) -> list[dict]:
    """Per STS language (and their mean) and dim: Spearman before, after and delta."""
    b = before.sts.spearman if before.sts else {}
    a = after.sts.spearman if after.sts else {}
    d = delta.sts or {}
    langs = sorted(lang for lang in a if lang != "mean") + (["mean"] if "mean" in a else [])
    return [
        _rounded(
            {
                "language": lang,
                "dim": int(dim),
                "before": b.get(lang, {}).get(dim),
                "after": a[lang][dim],
                "delta": d.get(lang, {}).get(dim),
            }
        )
        for lang in langs
        for dim in sorted(a[lang], key=int, reverse=True)
    ]


def _rounded(row: dict[str, Any], digits: int = 4) -> dict[str, Any]:
    return {k: round(v, digits) if isinstance(v, float) else v for k, v in row.items()}


def training_markdown(summary: FinetuneSummary) -> str:
    train = summary.train
    figures = [
        ("base model", summary.base_model),
        ("clean run", summary.clean_id),
        ("training data", summary.train_path),
        ("steps", train.steps),
        ("samples", train.samples),
        ("samples/s", train.samples_per_s),
        ("train seconds", train.train_seconds),
        (
            "loss on fixed batches (before → after)",
            describe_heldout_loss(train.heldout_loss_before, train.heldout_loss_after),
        ),
        ("per-step loss, first → last steps (batches differ: no trend)", f"{train.loss_start} → {train.loss_end}"),
        ("model", summary.model_url or summary.model_dir),
    ]
    return "### Fine-tuning\n\n" + markdown_table([{"figure": k, "value": v} for k, v in figures])


def pipeline_markdown(
    generated: GenerateSummary,
    cleaned: CleanSummary,
    tuned: FinetuneSummary | None,
    ledger_markdown: str | None = None,
) -> str:
    """One page over the three stages' summaries; ``ledger_markdown`` (the cost ledger) is appended as given."""
    by_type, counts, dropped = generated.examples_by_type, cleaned.counts, cleaned.dropped
    out = [
        f"# Pipeline {generated.run_id} → {cleaned.clean_id}\n",
        "## Generate\n",
        f"{sum(by_type.values())} examples from {generated.requests} requests "
        f"({generated.rejects} rejects), {generated.completion_tokens} completion tokens, "
        f"{generated.tokens_per_s:.1f} tokens/s over {generated.elapsed_s:.0f} s.\n",
        markdown_table([{"task type": t, "examples": n} for t, n in by_type.items()]),
        "## Clean\n",
        markdown_table([{"stage": s, "rows": n} for s, n in counts.items()]),
        "Dropped: " + (", ".join(f"{k} {v}" for k, v in dropped.items()) or "none") + ".\n",
        f"Export: {cleaned.export_dir}; report: {cleaned.report}.\n",
        "## Fine-tune\n",
    ]
    if tuned:
        out.append(f"Model: {tuned.model_url or tuned.model_dir}\n")
        deltas = tuned.key_deltas
        out.append(
            markdown_table(
                [{"metric": m, **{f"dim {d}": v for d, v in by_dim.items()}} for m, by_dim in deltas.items()]
            )
        )
    else:
        out.append("Not fine-tuned in this run.\n")
    if ledger_markdown:
        out += ["## Cost\n", ledger_markdown.rstrip() + "\n"]
    return "\n".join(out)


# --- reading what the clean artifacts show (DuckDB catalog views) --------------------------------
def clean_facts(catalog: Catalog, clean_id: str, runs: list[str]) -> dict[str, Any]:
    """Funnel counts, drop reasons with one detail each, and a repeatable triplet sample per task type."""
    with catalog.session():
        per_stage = funnel_counts(catalog, clean_id, runs)
        per_generator = generator_funnel(catalog, clean_id, runs)
        drops = drop_reasons(catalog, clean_id)
        samples = catalog.query(
            "SELECT task_type, query, positive, hard_negatives[1] AS hard_negative, positive_rank FROM mined "
            "WHERE clean_id = $c QUALIFY row_number() OVER (PARTITION BY task_type ORDER BY md5(example_id)) <= $k "
            "ORDER BY task_type, md5(example_id)",
            {"c": clean_id, "k": SAMPLES_PER_TYPE},
        ).to_pylist()
    return {"per_stage": per_stage, "per_generator": per_generator, "drops": drops, "samples": samples}


def drop_rows(drops: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"stage": d["stage"], "reason": d["reason"], "rows": d["n"], "example detail": short(d["detail"])}
        for d in drops
    ]


def sample_rows(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "task type": s["task_type"],
            "query": short(s["query"]),
            "positive": short(s["positive"]),
            "first hard negative": short(s["hard_negative"]),
            "positive rank": s["positive_rank"],
        }
        for s in samples
    ]


# --- publishing ------------------------------------------------------------------------------------
def in_run() -> bool:
    """True inside a Prefect flow or task run, where artifacts have a run to belong to."""
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def _publish(create: Callable[..., Any], **kwargs: Any) -> Any:
    """``create(**kwargs)`` synchronously inside a run (returns the artifact id); outside one: nothing, None."""
    if not in_run():
        return None
    try:
        return create(**kwargs, _sync=True)
    except Exception as exc:  # an artifact is a report: losing one must not fail the run it reports on
        _warn(f"could not publish artifact {kwargs.get('key') or kwargs.get('artifact_id')}: {exc}")
        return None


def _warn(message: str) -> None:
    from prefect import get_run_logger

    get_run_logger().warning(message)  # in the flow run's log, where the UI shows it


def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> Any:
    from prefect.artifacts import create_table_artifact

    return _publish(create_table_artifact, table=rows, key=KEYS[key], description=description)


def publish_markdown(key: str, markdown: str, description: str) -> Any:
    from prefect.artifacts import create_markdown_artifact

    return _publish(create_markdown_artifact, markdown=markdown, key=KEYS[key], description=description)


def publish_ablation(clean_id: str, rows: list[dict[str, Any]], markdown: str, description: str) -> None:
    """An ablation's table and notes, keyed by its clean run (``ablation-<clean id>``, ``…-notes``)."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    key = "ablation-" + "".join(c if c.isalnum() else "-" for c in clean_id.lower()).strip("-")
    _publish(create_table_artifact, table=rows, key=key, description=description)
    _publish(create_markdown_artifact, markdown=markdown, key=f"{key}-notes", description=description)


def publish_link(key: str, location: str, text: str, description: str) -> Any:
    from prefect.artifacts import create_link_artifact

    return _publish(
        create_link_artifact, link=as_link(location), link_text=text, key=KEYS[key], description=description
    )


class GenerateProgress:
    """The ``generate-progress`` artifact: parsed examples committed vs the run's target, per shard commit.

    ``shard_committed`` is the ``on_shard`` callback of ``tasks/generation/rounds.py``; the bar
    starts at what earlier sessions of a resumed run committed (``committed``).
    """

    def __init__(self, run_id: str, target: int, committed: int = 0):
        self.run_id, self.target, self.examples = run_id, target, committed
        self.rejects = self.brainstorm_shards = self.example_shards = 0
        self.artifact_id: Any = None

    @property
    def percent(self) -> float:
        return round(min(100.0, 100.0 * self.examples / self.target), 2) if self.target else 100.0

    @property
    def description(self) -> str:
        return (
            f"run {self.run_id}: {self.examples} of {self.target} parsed examples, {self.rejects} rejects "
            f"({self.example_shards} example and {self.brainstorm_shards} brainstorm shards committed this session)"
        )

    def start(self) -> None:
        from prefect.artifacts import create_progress_artifact

        self.artifact_id = _publish(
            create_progress_artifact, progress=self.percent, key=KEYS["generate_progress"], description=self.description
        )

    def shard_committed(self, record: ShardRecord) -> None:
        if record.kind == "examples":
            self.examples += record.rows
            self.rejects += record.rejects
            self.example_shards += 1
        else:
            self.brainstorm_shards += 1
        self.update()

    def update(self) -> None:
        from prefect.artifacts import update_progress_artifact

        if self.artifact_id is not None:
            _publish(
                update_progress_artifact,
                artifact_id=self.artifact_id,
                progress=self.percent,
                description=self.description,
            )


def publish_generate(store: RunStore) -> Any:
    """The per-task-type table of a generation run, from all its example and reject shards."""
    if not in_run():
        return None
    rows = generation_rows(**{kind: store.read_kind(kind, columns) for kind, columns in GENERATION_COLUMNS.items()})
    return publish_table("generate_task_types", rows, f"generation run {store.run_id}: per task type")


def publish_clean(catalog: Catalog, summary: CleanSummary) -> None:
    """The clean run's funnel, drop reasons, triplet sample, and links to its report and export."""
    clean_id = summary.clean_id
    if not in_run():
        return
    try:
        facts = clean_facts(catalog, clean_id, list(summary.runs))
    except Exception as exc:  # as in _publish: the report of a run never fails it
        _warn(f"could not read the clean artifacts' figures from the catalog: {exc}")
        return
    publish_table("clean_funnel", funnel_rows(facts["per_stage"]), f"clean run {clean_id}: rows per stage")
    if len(facts["per_generator"].get(GENERATED, {})) > 1:  # a mix of generator models: each one's funnel
        rows = funnel_rows(facts["per_generator"], "generator")
        publish_table("clean_generators", rows, f"clean run {clean_id}: rows per stage and generator model")
    publish_table("clean_drop_reasons", drop_rows(facts["drops"]), f"clean run {clean_id}: why rows were dropped")
    publish_table("clean_samples", sample_rows(facts["samples"]), f"clean run {clean_id}: sample triplets")
    publish_link("clean_report", summary.report, "report.html", f"clean run {clean_id}: the HTML report")
    publish_link("clean_export", summary.export_dir, "export", f"clean run {clean_id}: the training export")


def publish_finetune(summary: FinetuneSummary) -> None:
    """Before/after/delta per dim and per language, the training figures, and a link to the model."""
    before, after, delta = summary.before, summary.after, summary.delta
    name = f"{summary.base_model} on {summary.clean_id}"
    publish_table("finetune_dims", eval_dim_rows(before, after, delta), f"{name}: per Matryoshka dim")
    publish_table("finetune_languages", eval_language_rows(before, after, delta), f"{name}: STS per language")
    publish_markdown("finetune_training", training_markdown(summary), f"{name}: training")
    publish_link("finetune_model", summary.model_url or summary.model_dir, "model", f"{name}: the fine-tuned model")


def publish_pipeline(
    generated: GenerateSummary,
    cleaned: CleanSummary,
    tuned: FinetuneSummary | None,
    ledger_markdown: str | None = None,
) -> Any:
    markdown = pipeline_markdown(generated, cleaned, tuned, ledger_markdown)
    return publish_markdown("pipeline_summary", markdown, f"pipeline {generated.run_id}")
