"""The grounded steps of ``generate`` (``generation.corpus`` set): corpus → passages and personas → example shards.

Orchestration only, called by ``flows/generate.py`` inside the run's lock, in place of the brainstorm and
example rounds:

1. :func:`grounded_passages`: on a run's first session, the corpus is read (``storage/documents.py``),
   cut into passages (``tasks/generation/passages.py``), and each passage's top-k personas found by
   embedding similarity, with the cleaning's encoder (``clean.embedder``) and the embedding cache (the
   persona pool is encoded once; a second run over the same pool encodes nothing). The table is written
   once (``storage/passages.py``); later sessions plan from it.
2. :func:`grounded_examples`: the shards of one request per passage (``tasks/generation/grounded.py``),
   those not yet committed run under their claims, as example shards do.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
from prefect import get_run_logger

from ground import progress
from ground.settings import Settings
from llm.client import LLMClient, Sampling
from llm.embedder import make_embedder
from personas.sources import Persona
from storage.documents import corpus_files, read_documents
from storage.embedding_cache import EmbeddingCache, embeddings_dir, encode_cached
from storage.location import data_root, is_url
from storage.passages import read_passages, write_passages
from storage.records import RecordFileError
from storage.schemas import EXAMPLE_SCHEMA, PASSAGE_SCHEMA
from storage.shards import RunStore, read_parquet_checked
from tasks.generation.grounded import TASK_TYPE, grounded_shard_task, plan_grounded
from tasks.generation.passages import corpus_location, corpus_passages, top_personas
from tasks.generation.rounds import OnShard, ShardTally, run_shards


def persona_matcher(settings: Settings):
    """``encode(texts)``: the cleaning's encoder through the embedding cache under the data dir."""
    embedder = make_embedder(settings.clean)  # a local model loads only when a text is not cached yet
    cache = EmbeddingCache(embeddings_dir(data_root(settings.storage), embedder.model_key))
    return lambda texts: encode_cached(texts, embedder, cache)


#: texts encoded between two progress reports (the persona pool and the passages, in the CLI's bar)
ENCODE_CHUNK = 2048
PROGRESS_STAGE = "personas"


def _encoded(encode, texts: list[str]) -> np.ndarray:
    vectors = encode(texts)
    progress.advance(PROGRESS_STAGE, len(texts))
    return vectors


def grounded_passages(settings: Settings, store: RunStore, pool: list[Persona], encode=None) -> pa.Table:
    """The run's passages with their top-k personas: read from the run, or made (and written) on its first session."""
    stored = read_passages(store)
    if stored is not None:
        return stored
    logger = get_run_logger()
    gen = settings.generation
    location = corpus_location(gen.corpus)
    files = corpus_files(location, settings.storage.storage_options() if is_url(location) else None)
    passages, repeated = corpus_passages(
        read_documents(files, gen.corpus_text_column), gen.passage_min_words, gen.passage_max_words
    )
    if not passages:
        raise RecordFileError(
            f"{gen.corpus}: no passage of at least {gen.passage_min_words} words "
            "(lower generation.passage_min_words or use longer documents)"
        )
    logger.info(
        "corpus %s: %d file(s), %d passages of %d-%d words (%d repeated left out, %d other files skipped)",
        gen.corpus,
        len(files.files),
        len(passages),
        gen.passage_min_words,
        gen.passage_max_words,
        repeated,
        files.skipped,
    )
    encode = encode or persona_matcher(settings)
    started = time.monotonic()
    texts = [p.text for p in pool] + [p.text for p in passages]
    progress.add_total(PROGRESS_STAGE, len(texts))
    vectors = np.concatenate(
        [_encoded(encode, texts[i : i + ENCODE_CHUNK]) for i in range(0, len(texts), ENCODE_CHUNK)]
    )
    persona_vectors, passage_vectors = vectors[: len(pool)], vectors[len(pool) :]
    indices, scores = top_personas(passage_vectors, persona_vectors, gen.persona_top_k)
    logger.info(
        "persona retrieval: top %d of %d personas for %d passages in %.1fs",
        indices.shape[1],
        len(pool),
        len(passages),
        time.monotonic() - started,
    )
    table = pa.table(
        {
            "passage_id": [p.passage_id for p in passages],
            "document": [p.document for p in passages],
            "position": [p.position for p in passages],
            "words": [p.words for p in passages],
            "text": [p.text for p in passages],
            "personas": [[pool[i].persona_id for i in row] for row in indices.tolist()],
            "persona_scores": scores.tolist(),
        },
        schema=PASSAGE_SCHEMA,
    )
    write_passages(store, table)
    return table


async def grounded_examples(
    settings: Settings,
    store: RunStore,
    pool: list[Persona],
    passages: pa.Table,
    client: LLMClient,
    sampling: Sampling,
    tally: ShardTally,
    on_shard: OnShard | None = None,
) -> dict[str, int]:
    """One query per passage for at most ``generation.examples`` passages; the examples per task type."""
    gen = settings.generation
    shards = plan_grounded(
        store.run_id,
        passages,
        {p.persona_id: p.text for p in pool},
        gen.examples,
        gen.seed,
        gen.shard_size,
        gen.placeholder_overrides.get(TASK_TYPE),
    )
    todo = [s for s in shards if not store.is_complete("examples", s.shard_id)]
    tally.skipped += len(shards) - len(todo)
    progress.add_total("generate", sum(len(s.requests) for s in todo))
    get_run_logger().info(
        "grounded generation: %d passage(s) in %d shard(s), %d to run",
        sum(len(s.requests) for s in shards),
        len(shards),
        len(todo),
    )
    await run_shards(grounded_shard_task, store, todo, client, sampling, gen.shards_in_flight, on_shard)
    tally.written += len(todo)
    rows = sum(read_parquet_checked(store.shard_path("examples", s.shard_id), EXAMPLE_SCHEMA).num_rows for s in shards)
    return {TASK_TYPE: rows} if rows else {}


def grounded_target(settings: Settings, passages: pa.Table) -> dict[str, int]:
    """What a grounded run aims at: one example per passage, at most ``generation.examples``."""
    return {TASK_TYPE: min(settings.generation.examples, passages.num_rows)}
