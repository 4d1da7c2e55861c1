"""Benchmark grounded generation's persona retrieval: passages/s from passage text to its top-k personas at
100,000 personas, the step ``flows/grounded.py`` runs once per grounded run.

What is timed, on the passages of the shipped corpus (``python-docs``, repeated to ``--passages``):

* **persona vectors**: the persona pool encoded into the embedding cache (``storage/embedding_cache.py``)
  once (``first``), then read back from the cache as every later run does (``cached``, nothing encoded);
* **passages/s**: passage texts encoded (through the cache, as the flow does: new texts, so all encoded)
  plus the top-k search over the persona vectors (``tasks/generation/passages.top_personas``), and the
  search alone.

Personas are synthetic (an occupation, a trait and an interest from word lists: distinct texts). The
encoder is ``--embedder hash`` (default: ``bench/clean_growth.HashBagEmbedder``, a deterministic
bag-of-words stand-in, 384 dims, so the figure is the retrieval's own cost) or ``minilm`` (the real
all-MiniLM-L6-v2 of ``clean.embedder``, where encoding the passages dominates). The median of
``--trials`` (each with a fresh cache) is printed with the peak RSS.

    python bench/persona_retrieval.py --personas 100000 --passages 5000 --embedder hash
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from ground.settings import CleanSettings  # noqa: E402
from llm.embedder import make_embedder  # noqa: E402
from storage.documents import corpus_files, read_documents  # noqa: E402
from storage.embedding_cache import EmbeddingCache, encode_cached  # noqa: E402
from tasks.generation.passages import corpus_passages, shipped_corpus_path, top_personas  # noqa: E402

OCCUPATIONS = (
    "nurse teacher plumber astronomer baker lawyer farmer pilot librarian chemist carpenter journalist "
    "economist violinist firefighter architect biologist translator mechanic historian programmer "
    "pharmacist geologist photographer accountant sailor dentist electrician novelist statistician"
).split()
TRAITS = (
    "curious retired young meticulous skeptical self-taught award-winning part-time bilingual veteran "
    "first-year freelance rural urban pragmatic"
).split()
INTERESTS = (
    "open-source software|medieval castles|sourdough baking|climate policy|marathon training|jazz records|"
    "tax law|coral reefs|chess openings|urban gardening|vintage cars|bird migration|quantum computing|"
    "folk music|mountain rescue|data privacy|public transport|beekeeping|ancient Rome|solar panels"
).split("|")


def synthetic_personas(n: int, seed: int = 11) -> list[str]:
    rng = random.Random(seed)
    return [
        f"A {rng.choice(TRAITS)} {rng.choice(OCCUPATIONS)} interested in {rng.choice(INTERESTS)} "
        f"and {rng.choice(INTERESTS)} (#{i})"
        for i in range(n)
    ]


def passages(n: int) -> list[str]:
    found, _ = corpus_passages(read_documents(corpus_files(str(shipped_corpus_path()))), 60, 200)
    texts = [p.text for p in found]
    return [f"{texts[i % len(texts)]} ({i})" for i in range(n)]  # distinct texts: each one encoded


def embedder_of(name: str):
    if name == "hash":
        from clean_growth import HashBagEmbedder

        return HashBagEmbedder()
    return make_embedder(CleanSettings())


def measure(personas: list[str], texts: list[str], embedder_name: str, k: int) -> dict[str, float]:
    embedder = embedder_of(embedder_name)
    with tempfile.TemporaryDirectory() as folder:
        cache = EmbeddingCache(Path(folder) / "embeddings")
        started = time.perf_counter()
        encode_cached(personas, embedder, cache)
        first = time.perf_counter() - started
        started = time.perf_counter()
        persona_vectors = encode_cached(personas, embedder, cache)
        cached = time.perf_counter() - started
        started = time.perf_counter()
        passage_vectors = encode_cached(texts, embedder, cache)
        encoded = time.perf_counter()
        top_personas(passage_vectors, persona_vectors, k)
        done = time.perf_counter()
    return {
        "persona_first_s": first,
        "persona_cached_s": cached,
        "passages_per_s": len(texts) / (done - started),
        "search_per_s": len(texts) / (done - encoded),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--personas", type=int, default=100_000)
    parser.add_argument("--passages", type=int, default=5_000)
    parser.add_argument("--embedder", choices=("hash", "minilm"), default="hash")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    personas, texts = synthetic_personas(args.personas), passages(args.passages)
    results = [measure(personas, texts, args.embedder, args.top_k) for _ in range(args.trials)]

    def med(key: str) -> float:
        return statistics.median(r[key] for r in results)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(
        f"persona retrieval, {args.embedder} embedder, {args.personas:,} personas, {args.passages:,} passages, "
        f"top {args.top_k}, median of {args.trials}:"
    )
    print(
        f"  persona vectors: {med('persona_first_s'):.1f} s encoded once, "
        f"{med('persona_cached_s'):.2f} s from the cache"
    )
    print(f"  passages/s (encode + top-{args.top_k} search): {med('passages_per_s'):,.0f}")
    print(f"  passages/s (search alone): {med('search_per_s'):,.0f}")
    print(f"  peak RSS: {peak:.2f} GiB")


if __name__ == "__main__":
    main()
