"""Benchmark hard-negative mining against sentence-transformers' ``mine_hard_negatives``, fairly.

Both sides get the very same precomputed vectors and mine the same rows (all of them), and each
clock covers one mining call only: imports, data synthesis, model stand-in set-up and result
checks are outside both clocks.

* Ours: ``build_index`` + one top-N ``search`` + ``tasks.cleaning.negatives.mine_hard_negatives``.
* Theirs: ``sentence_transformers.util.mine_hard_negatives(..., use_faiss=True)`` with the same rank
  window and count. Its ``model`` is :class:`PrecomputedModel`, a stand-in that hands back our vectors
  for exactly the texts it is asked to encode (and raises on anything else), so it embeds nothing and
  no private cache format is relied on. The installed version is checked at start for the keywords
  used here.

Trials alternate which side runs first (ours, theirs / theirs, ours / ...); the median and range of
each side and of the ratio (theirs / ours) are printed last. An untimed check then mines once more on
both sides with ``top`` selection and counts equal negatives on the rows where both read the same
window (rows whose positive is not among the top N results: theirs counts ranks without the positive,
ours counts it). The rank filter's decisions are checked against NumPy exact search, and the flow's
own path (filter, then mine the kept rows) is timed once for reference. Dedup timing and
all-MiniLM-L6-v2 throughput (the model time the mining clocks exclude) are printed as well.

    python bench/cleaning.py                       # 20k queries x 40k corpus, 3 trials (~3 min, 2 cores)
    python bench/cleaning.py --samples 50000       # the issue's size: 50k x 100k
"""

from __future__ import annotations

import argparse
import gc
import inspect
import os
import random
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow as pa

os.environ.setdefault("TQDM_DISABLE", "1")  # the reference's progress bars, even with verbose=False
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ground.settings import CleanSettings  # noqa: E402
from storage.schemas import EXAMPLE_SCHEMA  # noqa: E402
from tasks.cleaning.dedup import exact_dedup, near_dedup  # noqa: E402
from tasks.cleaning.negatives import mine_hard_negatives  # noqa: E402
from tasks.cleaning.rank_filter import rank_filter  # noqa: E402
from tasks.cleaning.search import build_index, result_width, search  # noqa: E402

#: keywords of sentence-transformers' mine_hard_negatives this bench passes (present since 3.1)
ST_KEYWORDS = (
    "corpus",
    "range_min",
    "range_max",
    "num_negatives",
    "sampling_strategy",
    "use_faiss",
    "output_format",
    "verbose",
)


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def measured(name: str, results: dict, quiet: bool = False):
    """Wall time and peak RSS (sampled every 10 ms) of the block, appended to ``results[name]``."""
    gc.collect()
    base = rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.wait(0.01):
            peak[0] = max(peak[0], rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        yield
    finally:
        elapsed = time.perf_counter() - start
        done.set()
        sampler.join()
        peak[0] = max(peak[0], rss_bytes())
        results.setdefault(name, []).append((elapsed, peak[0] - base))
        if not quiet:
            print(f"  {name:<34} {elapsed:8.2f} s   peak RSS +{(peak[0] - base) / 2**30:.2f} GiB", flush=True)


# --- synthetic data ---------------------------------------------------------------------------
WORDS = [f"w{i}" for i in range(20000)]


def synthetic_examples(n: int, seed: int) -> pa.Table:
    """Example rows with wordy queries/documents; 3% exact and 3% near duplicates planted."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    queries = [" ".join(words[rng.integers(0, len(words), k)]) for k in rng.integers(5, 16, n)]
    docs = [" ".join(words[rng.integers(0, len(words), k)]) for k in rng.integers(40, 120, n)]
    dup = rng.choice(n, size=n // 33, replace=False)
    src = rng.integers(0, n, len(dup))
    for d, s in zip(dup[: len(dup) // 2], src, strict=False):  # exact (case/space-insensitive) duplicates
        queries[d], docs[d] = queries[s].upper(), docs[s] + "  "
    for d, s in zip(dup[len(dup) // 2 :], src[len(dup) // 2 :], strict=True):  # near duplicates: one word changed
        tokens = docs[s].split()
        tokens[len(tokens) // 2] = "changed"
        queries[d], docs[d] = queries[s] + " extra", " ".join(tokens)
    task_types = np.array(["retrieval", "long_long", "short_short", "sts", "bitext", "classification"])
    columns = {name: pa.nulls(n, field.type) for name, field in zip(EXAMPLE_SCHEMA.names, EXAMPLE_SCHEMA, strict=True)}
    columns.update(
        {
            "example_id": pa.array([f"bench:{i:08d}" for i in range(n)]),
            "run_id": pa.array(["bench"] * n),
            "task_type": pa.array(task_types[rng.integers(0, 5, n)]),  # document-positive types
            "instruction": pa.array(["Given a query, retrieve a relevant document."] * n),
            "query": pa.array(queries),
            "positive": pa.array(docs),
            "negative": pa.array([None] * n, pa.string()),
        }
    )
    return pa.table(columns, schema=EXAMPLE_SCHEMA)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def synthetic_embeddings(n: int, dim: int, seed: int):
    """Topic-clustered vectors: query = positive + noise of varying strength, so some positives rank low."""
    rng = np.random.default_rng(seed)
    topics = unit(rng.standard_normal((max(1, n // 50), dim), dtype=np.float32))
    topic = rng.integers(0, len(topics), n)
    positives = unit(topics[topic] + 0.6 * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim) * 8)
    negatives = unit(topics[topic] + 0.6 * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim) * 8)
    noise = rng.uniform(0.2, 1.6, (n, 1)).astype(np.float32)
    queries = unit(positives + noise * rng.standard_normal((n, dim), dtype=np.float32) / np.sqrt(dim) * 4)
    corpus = np.concatenate([positives, negatives])
    return queries, corpus, np.arange(n, dtype=np.int64)


# --- the reference ----------------------------------------------------------------------------
def reference_function():
    """sentence-transformers' mine_hard_negatives, after checking it takes the keywords used here."""
    import sentence_transformers
    from sentence_transformers.util import mine_hard_negatives as st_mine

    missing = [k for k in ST_KEYWORDS if k not in inspect.signature(st_mine).parameters]
    if missing:
        sys.exit(
            f"sentence-transformers {sentence_transformers.__version__}: mine_hard_negatives lacks "
            f"{missing}; this bench needs >= 3.1"
        )
    return sentence_transformers.__version__, st_mine


class PrecomputedModel:
    """Stands in for a SentenceTransformer: ``encode*`` return given vectors for exactly the given texts.

    Any other text list, or any model attribute not defined here, raises: the reference must not
    embed anything, and an API change in sentence-transformers should stop the bench, not skew it.
    """

    def __init__(self, dim: int, *known: tuple[list[str], np.ndarray]):
        import torch

        self.device = torch.device("cpu")
        self.model_card_data = SimpleNamespace(base_model=None)
        self._dim = dim
        self._known = known
        self.encoded = 0

    def encode(self, sentences, **_) -> np.ndarray:
        sentences = list(sentences)
        for texts, vectors in self._known:
            if sentences == texts:
                self.encoded += 1
                return vectors
        raise RuntimeError(f"reference asked to encode {len(sentences)} texts this bench did not precompute")

    encode_query = encode_document = encode

    def get_embedding_dimension(self) -> int:
        return self._dim

    get_sentence_embedding_dimension = get_embedding_dimension

    def similarity(self, a, b):
        import torch

        return torch.as_tensor(a) @ torch.as_tensor(b).T

    def similarity_pairwise(self, a, b):
        import torch

        return (torch.as_tensor(a) * torch.as_tensor(b)).sum(dim=-1)

    def __getattr__(self, name: str):
        raise AttributeError(f"PrecomputedModel has no {name!r}: this sentence-transformers version needs it")


def reference_mine(
    st_mine, model: PrecomputedModel, dataset, corpus_texts: list[str], cfg: CleanSettings, strategy: str
):
    random.seed(cfg.seed)  # its "random" strategy draws from Python's random
    before = model.encoded
    out = st_mine(
        dataset,
        model,
        corpus=corpus_texts,
        range_min=cfg.negative_rank_min,
        range_max=cfg.negative_rank_max,
        num_negatives=cfg.negatives_per_query,
        sampling_strategy=strategy,
        use_faiss=True,
        output_format="n-tuple",
        verbose=False,
    )
    if model.encoded - before != 2:
        raise RuntimeError(f"reference encoded {model.encoded - before} lists, expected 2 (queries, corpus)")
    return out


def our_mine(rows: pa.Table, queries, corpus, positive_idx, corpus_texts, cfg: CleanSettings):
    index = build_index(corpus, cfg)
    ids, scores = search(index, queries, result_width(cfg))
    return mine_hard_negatives(rows, ids, scores, corpus_texts, corpus, positive_idx, cfg), ids


def brute_force_keep(queries, corpus, positive_idx, k: int, sample: np.ndarray) -> np.ndarray:
    """Exact ranks by NumPy for a sample of queries: rank = 1 + #corpus items scoring higher."""
    q = queries[sample]
    pos_scores = np.einsum("ij,ij->i", q, corpus[positive_idx[sample]])
    higher = np.zeros(len(sample), dtype=np.int64)
    for start in range(0, len(corpus), 65536):
        higher += (q @ corpus[start : start + 65536].T > pos_scores[:, None]).sum(axis=1)
    return higher + 1 <= k


def embedding_throughput(texts_n: int) -> None:
    from ground.compute import bf16_supported
    from tasks.cleaning.embed import SentenceTransformerEmbedder

    sentences = [
        f"A sentence about topic {i % 37} with detail number {i} for the embedding benchmark." for i in range(texts_n)
    ]
    for bf16 in [False, True] if bf16_supported() else [False]:
        embedder = SentenceTransformerEmbedder(bf16=bf16)
        embedder.encode(sentences[:16])  # warm-up
        start = time.perf_counter()
        embedder.encode(sentences)
        elapsed = time.perf_counter() - start
        print(f"  all-MiniLM-L6-v2 {'bf16' if bf16 else 'fp32'}: {texts_n / elapsed:7.1f} texts/s")


def spread(values: list[float], unit_: str = "s") -> str:
    return f"median {statistics.median(values):7.2f} {unit_} (range {min(values):.2f}-{max(values):.2f})"


def check_equal_decisions(
    st_mine, model, dataset, rows, queries, corpus, positive_idx, corpus_texts, cfg: CleanSettings
) -> None:
    """Untimed: both sides with ``top`` selection; equal negatives on rows where both read the same window."""
    top = cfg.model_copy(update={"negative_mode": "top"})
    ours, ids = our_mine(rows, queries, corpus, positive_idx, corpus_texts, top)
    theirs = reference_mine(st_mine, model, dataset, corpus_texts, top, "top")
    comparable = ~(ids == positive_idx[:, None]).any(axis=1)  # positive beyond the top N: same window
    our_negs = dict(zip(ours.kept["example_id"].to_pylist(), ours.kept["hard_negatives"].to_pylist(), strict=True))
    their_columns = theirs.to_dict()  # column lists, materialised once
    negative_lists = zip(*(their_columns[c] for c in theirs.column_names if c.startswith("negative_")), strict=True)
    their_negs = {int(a[1:]): list(negs) for a, negs in zip(their_columns["anchor"], negative_lists, strict=True)}
    rows_checked = np.flatnonzero(comparable)
    equal = sum(set(our_negs.get(f"bench:{i:08d}", [])) == set(their_negs.get(int(i), [])) for i in rows_checked)
    print(
        f"  negatives equal to sentence-transformers' ('top' selection) on {equal}/{len(rows_checked)} rows "
        f"whose positive is beyond the top {ids.shape[1]} (the rows where both read the same window)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20_000, help="queries; the corpus is 2 x samples")
    parser.add_argument("--trials", type=int, default=3, help="mining trials per side, alternating which goes first")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-queries", type=int, default=2000, help="queries checked against NumPy exact search")
    parser.add_argument("--embed-texts", type=int, default=256, help="texts for embedding throughput (0: skip)")
    parser.add_argument("--skip-dedup", action="store_true")
    args = parser.parse_args()
    st_version, st_mine = reference_function()  # before anything slow: a wrong version stops here
    cfg = CleanSettings()
    n = args.samples
    print(
        f"samples {n}, corpus {2 * n}, dim {args.dim}, k {cfg.rank_top_k}, negatives {cfg.negatives_per_query} "
        f"from ranks {cfg.negative_rank_min}-{cfg.negative_rank_max}, sentence-transformers {st_version}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    results: dict = {}

    if not args.skip_dedup:
        table = synthetic_examples(n, args.seed)
        with measured("dedup exact (DuckDB)", results):
            exact = exact_dedup(table)
        with measured("dedup near (MinHash LSH)", results):
            near = near_dedup(exact.kept, cfg)
        print(f"  dropped exact {exact.dropped.num_rows}, near {near.dropped.num_rows} of {n}")
        del table, exact, near

    from datasets import Dataset

    queries, corpus, positive_idx = synthetic_embeddings(n, args.dim, args.seed)
    query_texts = [f"q{i}" for i in range(n)]
    corpus_texts = [f"d{i}" for i in range(len(corpus))]
    rows = pa.table(
        {
            "example_id": [f"bench:{i:08d}" for i in range(n)],
            "run_id": ["bench"] * n,
            "task_type": ["retrieval"] * n,
            "query": query_texts,
        }
    )
    dataset = Dataset.from_dict({"anchor": query_texts, "positive": corpus_texts[:n]})
    model = PrecomputedModel(args.dim, (query_texts, queries), (corpus_texts, corpus))
    print(f"  embedding matrices: {(queries.nbytes + corpus.nbytes) / 2**30:.2f} GiB")

    sides = {
        "ours": lambda: our_mine(rows, queries, corpus, positive_idx, corpus_texts, cfg),
        "sentence-transformers": lambda: reference_mine(st_mine, model, dataset, corpus_texts, cfg, "random"),
    }
    print(f"mining all {n} rows, same vectors, {args.trials} trials alternating the order:")
    for trial in range(args.trials):
        order = list(sides) if trial % 2 == 0 else list(sides)[::-1]
        for name in order:
            with measured(f"trial {trial}: {name}", results):
                out = sides[name]()
            results.setdefault(name, []).append(results.pop(f"trial {trial}: {name}")[0])
            del out
            gc.collect()

    print("checks (untimed):")
    check_equal_decisions(st_mine, model, dataset, rows, queries, corpus, positive_idx, corpus_texts, cfg)
    with measured("ours, flow path: filter + mine kept", results):
        index = build_index(corpus, cfg)
        filtered, found = rank_filter(rows, queries, corpus, positive_idx, cfg, index)
        mined = mine_hard_negatives(
            filtered.kept, found.ids, found.scores, corpus_texts, corpus, positive_idx[found.rows], cfg
        )
    print(
        f"  kept {filtered.kept.num_rows} of {n} (positive in top {cfg.rank_top_k}), mined rows {mined.kept.num_rows}"
    )
    sample = np.random.default_rng(1).choice(n, size=min(args.check_queries, n), replace=False)
    expected = brute_force_keep(queries, corpus, positive_idx, cfg.rank_top_k, sample)
    kept_ids = set(filtered.kept["example_id"].to_pylist())
    agree = np.array([f"bench:{i:08d}" in kept_ids for i in sample]) == expected
    print(f"  filter decisions equal to NumPy exact search on {int(agree.sum())}/{len(sample)} queries")
    del filtered, found, mined, index

    if args.embed_texts:
        print("embedding throughput (the model time both mining clocks exclude):")
        embedding_throughput(args.embed_texts)

    ours = [t for t, _ in results["ours"]]
    theirs = [t for t, _ in results["sentence-transformers"]]
    ratios = [b / a for a, b in zip(ours, theirs, strict=True)]
    print(f"mining {n} queries x {2 * n} corpus, {args.trials} trials, load average now {os.getloadavg()[0]:.1f}:")
    print(f"  ours                  {spread(ours)}   peak RSS +{max(r for _, r in results['ours']) / 2**30:.2f} GiB")
    print(
        f"  sentence-transformers {spread(theirs)}   peak RSS "
        f"+{max(r for _, r in results['sentence-transformers']) / 2**30:.2f} GiB"
    )
    print(f"  speed ratio (sentence-transformers / ours): {spread(ratios, 'x')}")


if __name__ == "__main__":
    main()
