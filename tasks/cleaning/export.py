"""Export the mined corpus as training files and write its dataset card.

Input: the ``mined`` stage table, i.e. the ``EXAMPLE_SCHEMA`` columns plus ``positive_rank``,
``positive_score``, ``hard_negatives`` (list<string>) and ``hard_negative_scores``.

``export_corpus(table, out_dir, cfg)`` writes, for the ``train`` and the ``heldout`` split (the table
whole, or streamed as :class:`ExportRows`):

``<split>.jsonl`` / ``<split>.parquet``
    KaLM-Embedding / FlagEmbedding records, one per example::

        {"query": "Instruct: <instruction>\\nQuery: <query>", "pos": [<positive>],
         "neg": [<generated negative>, <hard negatives>...], "task_name": <task_type>,
         "example_id": <example_id>}

    The instruction goes on the query only; positives and negatives are plain texts. ``neg`` is the
    generated negative (if any) followed by the mined hard negatives, blank texts dropped,
    de-duplicated (whitespace-trimmed comparison), never equal to the positive, capped at
    ``cfg.negatives_per_query``.
``<split>_st.parquet``
    sentence-transformers columns ``anchor`` (the instructed query), ``positive``,
    ``negative_1`` .. ``negative_n`` (n = ``cfg.negatives_per_query``; null where a row has fewer).

The split is deterministic: every ``example_id`` is hashed with ``cfg.seed`` (BLAKE2b) and, within
each task type, the ``round(rows * cfg.heldout_fraction)`` rows with the smallest hashes are held
out, so every task type with at least ``1 / heldout_fraction`` rows has held-out rows, the
proportion is the same for every type, and the split depends neither on row order nor on other
task types. The files themselves are written by ``storage.corpus.ExportWriter``: streamed to temporary
names and renamed when complete, so a crash leaves the previous export or none, never half a file.

``write_dataset_card(out_dir, result, meta)`` writes the Hugging Face ``README.md`` (YAML front
matter: license, task categories, configs for the train/held-out files). Publishing the folder is
``tasks/cleaning/publish.py``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa

from ground.settings import CleanSettings
from storage.atomic import atomic_write_bytes
from storage.corpus import ExportWriter

log = logging.getLogger(__name__)

SPLITS = ("train", "heldout")
LICENSE = "cc-by-nc-sa-4.0"  # Persona Hub (proj-persona/PersonaHub) is CC-BY-NC-SA-4.0; the data inherits it
REQUIRED_COLUMNS = ("example_id", "task_type", "instruction", "query", "positive")
BATCH_ROWS = 8192
#: the columns every exported row must have a value in: read first, for the checks and the split
KEY_COLUMNS = ("example_id", "task_type", "query", "positive")
#: the columns the files are made of
EXPORT_COLUMNS = ("example_id", "task_type", "instruction", "query", "positive", "negative", "hard_negatives")


class ExportError(RuntimeError):
    """The input table cannot be exported (the message says why)."""


@dataclass
class ExportResult:
    """What ``export_corpus`` wrote: file paths by name, row counts per split and task type."""

    out_dir: Path
    files: dict[str, Path]  # "train.jsonl" -> path, ... (6 files)
    counts: dict[str, dict[str, int]]  # split -> task_type -> rows
    negatives_per_query: int
    heldout_fraction: float
    seed: int
    negatives: dict[str, dict[int, int]] = field(default_factory=dict)  # split -> #negatives -> rows

    def rows(self, split: str | None = None) -> int:
        splits = [split] if split else list(self.counts)
        return sum(sum(self.counts.get(s, {}).values()) for s in splits)

    @property
    def task_types(self) -> list[str]:
        return sorted({t for per_type in self.counts.values() for t in per_type})

    def to_json(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "files": {name: str(path) for name, path in self.files.items()},
            "counts": self.counts,
            "negatives_per_query": self.negatives_per_query,
            "heldout_fraction": self.heldout_fraction,
            "seed": self.seed,
            "negatives": {s: {str(k): v for k, v in h.items()} for s, h in self.negatives.items()},
        }


# --- records ------------------------------------------------------------------------------------
def format_query(instruction: str | None, query: str) -> str:
    """The KaLM / E5-mistral query form; a row without an instruction keeps the bare query."""
    instruction = (instruction or "").strip()
    query = (query or "").strip()
    return f"Instruct: {instruction}\nQuery: {query}" if instruction else query


def select_negatives(positive: str, generated: str | None, hard: Iterable[str | None] | None, cap: int) -> list[str]:
    """Generated negative first, then hard negatives; no blanks, no duplicates, never the positive."""
    seen = {(positive or "").strip()}
    out: list[str] = []
    for text in [generated, *(hard or [])]:
        if len(out) >= cap:
            break
        if text is None:
            continue
        key = text.strip()
        if not key or key in seen:
            continue
        seen.add(key)
        out.append(text)
    return out


def _hash_key(seed: int, example_id: str) -> bytes:
    return hashlib.blake2b(f"{seed}\x1f{example_id}".encode(), digest_size=8).digest()


def heldout_quota(rows: int, fraction: float) -> int:
    """Held-out rows for a task type: round(rows * fraction), never every row of a type."""
    if rows <= 0 or fraction <= 0:
        return 0
    return min(int(rows * fraction + 0.5), rows - 1)


def split_mask(example_ids: list[str], task_types: list[str], fraction: float, seed: int) -> list[bool]:
    """True for the held-out rows: per task type, the rows whose seeded hash of example_id is smallest."""
    by_type: dict[str, list[int]] = defaultdict(list)
    for index, task_type in enumerate(task_types):
        by_type[task_type].append(index)
    mask = [False] * len(example_ids)
    for indices in by_type.values():
        quota = heldout_quota(len(indices), fraction)
        if not quota:
            continue
        ranked = sorted(indices, key=lambda i: (_hash_key(seed, example_ids[i]), example_ids[i]))
        for i in ranked[:quota]:
            mask[i] = True
    return mask


def _column(batch: pa.RecordBatch | pa.Table, name: str) -> list[Any]:
    index = batch.schema.get_field_index(name)
    return batch.column(index).to_pylist() if index >= 0 else [None] * batch.num_rows


@dataclass
class ExportRows:
    """Rows to export that come in batches (memory: one batch, plus the ids for the held-out split).

    ``schema``: their columns; ``keys``: the rows (at least their ``KEY_COLUMNS``) in batches, read first
    for the checks and the split; ``batches``: the rows again, in the same order, as the files get them
    (batches of :data:`BATCH_ROWS` rows make the same files as the whole table)."""

    schema: pa.Schema
    keys: Iterable[pa.Table]
    batches: Iterable[pa.RecordBatch | pa.Table]


def export_corpus(rows: pa.Table | ExportRows, out_dir: Path, cfg: CleanSettings) -> ExportResult:
    """Write train/held-out KaLM JSONL + Parquet and sentence-transformers Parquet under ``out_dir``."""
    if isinstance(rows, pa.Table):
        rows = ExportRows(rows.schema, [rows], rows.to_batches(max_chunksize=BATCH_ROWS))
    schema, keys, batches = rows.schema, rows.keys, rows.batches
    missing = [name for name in REQUIRED_COLUMNS if name not in schema.names]
    if missing:
        raise ExportError(f"the table to export lacks column(s) {', '.join(missing)}")
    nulls: Counter = Counter()
    example_ids: list[str] = []
    task_types: list[str] = []
    for part in keys:
        for name in KEY_COLUMNS:
            nulls[name] += part.column(name).null_count
        example_ids += part.column("example_id").to_pylist()
        task_types += part.column("task_type").to_pylist()
    for name in KEY_COLUMNS:
        if nulls[name]:
            raise ExportError(f"{nulls[name]} row(s) have no {name}; export the mined table")
    out_dir = Path(out_dir)
    cap = cfg.negatives_per_query
    duplicates = [eid for eid, n in Counter(example_ids).items() if n > 1]
    if duplicates:
        raise ExportError(f"{len(duplicates)} example_id(s) occur more than once, e.g. {duplicates[0]!r}")
    heldout = split_mask(example_ids, task_types, cfg.heldout_fraction, cfg.seed)
    del example_ids, task_types

    counts: dict[str, Counter] = {split: Counter() for split in SPLITS}
    neg_hist: dict[str, Counter] = {split: Counter() for split in SPLITS}
    neg_names = [f"negative_{i}" for i in range(1, cap + 1)]
    offset = 0
    with ExportWriter(out_dir, SPLITS, cap) as export:
        for batch in batches:
            cols = {name: _column(batch, name) for name in EXPORT_COLUMNS}
            kalm_rows: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
            st_rows: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}
            for i in range(batch.num_rows):
                split = "heldout" if heldout[offset + i] else "train"
                positive = cols["positive"][i]
                negs = select_negatives(positive, cols["negative"][i], cols["hard_negatives"][i], cap)
                query = format_query(cols["instruction"][i], cols["query"][i])
                record = {
                    "query": query,
                    "pos": [positive],
                    "neg": negs,
                    "task_name": cols["task_type"][i],
                    "example_id": cols["example_id"][i],
                }
                kalm_rows[split].append(record)
                st_row = {"anchor": query, "positive": positive}
                st_row.update({name: (negs[j] if j < len(negs) else None) for j, name in enumerate(neg_names)})
                st_rows[split].append(st_row)
                counts[split][record["task_name"]] += 1
                neg_hist[split][len(negs)] += 1
            offset += batch.num_rows
            for split in SPLITS:
                export.write(split, kalm_rows[split], st_rows[split])
    result = ExportResult(
        out_dir=out_dir,
        files=export.files,
        counts={split: dict(sorted(counts[split].items())) for split in SPLITS},
        negatives_per_query=cap,
        heldout_fraction=cfg.heldout_fraction,
        seed=cfg.seed,
        negatives={split: dict(sorted(neg_hist[split].items())) for split in SPLITS},
    )
    log.info("exported %d train and %d held-out rows to %s", result.rows("train"), result.rows("heldout"), out_dir)
    return result


# --- dataset card -------------------------------------------------------------------------------
_TASK_CATEGORIES = {
    "retrieval": "text-retrieval",
    "classification": "text-classification",
    "short_short": "sentence-similarity",
    "long_long": "sentence-similarity",
    "sts": "sentence-similarity",
    "bitext": "translation",
}


def _size_category(rows: int) -> str:
    for limit, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
    ):
        if rows < limit:
            return name
    return "10M<n<100M"


def _yaml_list(key: str, values: Iterable[str], indent: str = "") -> list[str]:
    values = list(values)
    if not values:
        return []
    # JSON strings are valid YAML scalars, so any text is quoted safely
    return [f"{indent}{key}:"] + [f"{indent}- {json.dumps(v, ensure_ascii=False)}" for v in values]


def _md_cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def write_dataset_card(out_dir: Path, result: ExportResult, meta: dict[str, Any] | None = None) -> Path:
    """Write ``<out_dir>/README.md``, the Hugging Face dataset card, and return its path.

    ``meta`` (all optional): ``model`` (generation model, str or list), ``embedding_model``,
    ``runs`` (generation run ids), ``clean_id``, ``personas`` (persona source), ``pretty_name``,
    ``languages`` (default ``["en"]``), ``license`` (default cc-by-nc-sa-4.0, Persona Hub's),
    ``settings`` (dict of cleaning settings, shown as JSON), ``repo_id`` (for the loading snippet).
    """
    meta = dict(meta or {})
    out_dir = Path(out_dir)
    models = meta.get("model") or "unknown"
    models = [models] if isinstance(models, str) else list(models)
    license_id = meta.get("license", LICENSE)
    pretty_name = meta.get("pretty_name", "embed-factory synthetic embedding training data")
    task_types = result.task_types
    categories = sorted({"feature-extraction", *(_TASK_CATEGORIES.get(t, "sentence-similarity") for t in task_types)})
    total = result.rows()
    repo = meta.get("repo_id") or "<owner>/<name>"

    front = ["---", f"license: {license_id}", f"pretty_name: {json.dumps(pretty_name, ensure_ascii=False)}"]
    front += _yaml_list("language", meta.get("languages") or ["en"])
    front += _yaml_list("task_categories", categories)
    front += _yaml_list("tags", ["synthetic", "embeddings", "persona-hub", "kalm-embedding", "hard-negatives"])
    front += _yaml_list("size_categories", [_size_category(total)])
    front.append("configs:")
    for config, suffix, default in (("default", "", True), ("sentence-transformers", "_st", False)):
        front.append(f"- config_name: {config}")
        if default:
            front.append("  default: true")
        front.append("  data_files:")
        for split in SPLITS:
            if result.rows(split) or split == "train":
                front.append(f"  - split: {split}")
                front.append(f"    path: {split}{suffix}.parquet")
    front.append("---")

    lines = [f"# {pretty_name}", ""]
    lines += [
        "Synthetic training data for text-embedding models, produced by "
        "embed-factory after the KaLM-Embedding recipe "
        "(Persona Hub personas as system prompts, six task types, LLM generation with vLLM, "
        "validation, deduplication, ranking-consistency filtering and hard-negative mining).",
        "",
        "## Pipeline",
        "",
        "1. **Personas**: Persona Hub personas (or a bundled seed set) are used as the *system prompt* of "
        "brainstorm requests, which produce task instructions for retrieval, classification, "
        "short-short and long-long matching; STS and bitext are generated directly.",
        "2. **Generation**: one example per unique instruction (query, positive, optionally a generated "
        "negative), decoded under a JSON schema and validated.",
        "3. **Cleaning**: validation (lengths, language), exact and MinHash near-duplicate removal.",
        "4. **Ranking-consistency filter**: an example is kept only if its positive ranks within the "
        "top k for its query among all documents (embedding search).",
        "5. **Hard negatives**: mined from a lower rank band of the same search, prepended by the "
        "generated negative, de-duplicated and never equal to the positive.",
        "6. **Split**: a deterministic held-out split by a seeded hash of `example_id`, stratified by task type "
        f"(fraction {result.heldout_fraction}, seed {result.seed}).",
        "",
        "## Generation",
        "",
        f"- Generation model: {', '.join(f'`{m}`' for m in models)}",
    ]
    if meta.get("embedding_model"):
        lines.append(f"- Embedding model (filter and negatives): `{meta['embedding_model']}`")
    if meta.get("personas"):
        lines.append(f"- Personas: {meta['personas']}")
    if meta.get("runs"):
        lines.append(f"- Generation runs: {', '.join(f'`{r}`' for r in meta['runs'])}")
    if meta.get("clean_id"):
        lines.append(f"- Clean run: `{meta['clean_id']}`")
    lines.append(f"- Negatives per query: up to {result.negatives_per_query}")
    lines += ["", "## Counts", "", "| task type | train | heldout | total |", "|---|---:|---:|---:|"]
    for task_type in task_types:
        train = result.counts.get("train", {}).get(task_type, 0)
        held = result.counts.get("heldout", {}).get(task_type, 0)
        lines.append(f"| {_md_cell(task_type)} | {train} | {held} | {train + held} |")
    lines.append(f"| **total** | **{result.rows('train')}** | **{result.rows('heldout')}** | **{total}** |")
    example = {
        "query": "Instruct: <instruction>\nQuery: <query>",
        "pos": ["<positive>"],
        "neg": ["<negative>", "..."],
        "task_name": "<task type>",
        "example_id": "<run>:<shard>-<n>",
    }
    lines += [
        "",
        "## Files and format",
        "",
        "| file | format |",
        "|---|---|",
        "| `train.jsonl`, `heldout.jsonl` | KaLM-Embedding / FlagEmbedding records, one JSON object a line |",
        "| `train.parquet`, `heldout.parquet` | the same records (config `default`) |",
        "| `train_st.parquet`, `heldout_st.parquet` | sentence-transformers columns `anchor`, `positive`, "
        f"`negative_1`..`negative_{result.negatives_per_query}` (config `sentence-transformers`) |",
        "",
        "The instruction is on the query only; positives and negatives are plain texts:",
        "",
        "```json",
        json.dumps(example, ensure_ascii=False),
        "```",
        "",
        "```python",
        "from datasets import load_dataset",
        f'ds = load_dataset("{repo}")                          # KaLM records',
        f'st = load_dataset("{repo}", "sentence-transformers")  # anchor / positive / negative_i',
        "```",
        "",
        "## License",
        "",
        f"`{license_id}`. The personas come from Persona Hub (`proj-persona/PersonaHub`, CC-BY-NC-SA-4.0), "
        "so the generated data inherits its non-commercial share-alike terms; the terms of the "
        "generation model also apply.",
    ]
    if meta.get("settings"):
        lines += ["", "## Settings", "", "```json", json.dumps(meta["settings"], indent=2, default=str), "```"]
    lines += ["", f"_Card written {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}._", ""]
    path = out_dir / "README.md"
    atomic_write_bytes(path, ("\n".join(front) + "\n\n" + "\n".join(lines)).encode("utf-8"))
    return path
