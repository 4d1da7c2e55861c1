"""Integration: a grounded run on the shipped corpus against the real embedded vLLM server (marker ``llm``).

SmolLM2-135M answers both grounded prompts under their JSON schemas (vLLM's guided decoding); every row's
positive is its source passage, its persona one of the passage's top k, its lineage complete."""

from __future__ import annotations

import asyncio
import json

import pytest

from prompts.grounded import DIFFICULTIES, QUESTION_TYPES
from storage.lineage import read_lineage
from storage.passages import read_passages
from storage.shards import RunStore

pytestmark = pytest.mark.llm


def test_a_grounded_run_on_the_shipped_corpus_with_the_real_server(
    llm_base_url, prefect_api_url, data_dir, monkeypatch
):
    from flows.generate import generate

    monkeypatch.setenv("EMBED_FACTORY_GENERATION__SHARD_SIZE", "4")
    monkeypatch.setenv(
        "EMBED_FACTORY_GENERATION__PLACEHOLDER_OVERRIDES", json.dumps({"retrieval": {"language": ["English"]}})
    )
    summary = asyncio.run(generate(run_id="it-grounded", examples=8, seed=7, corpus="python-docs"))
    store = RunStore(data_dir, "it-grounded")
    passages = {p["passage_id"]: p for p in read_passages(store).to_pylist()}
    lineage = {r["example_id"]: r for r in read_lineage(store).to_pylist()}
    rows = store.read_kind("examples").to_pylist()
    assert summary.examples_by_type.get("retrieval", 0) == len(rows) >= 4, summary
    for row in rows:
        line = lineage[row["example_id"]]
        passage = passages[line["passage_id"]]
        assert row["positive"] == passage["text"], "the positive is the source passage"
        assert row["query"].strip() and row["query"] != row["positive"]
        assert row["persona_id"] in passage["personas"]
        assert line["question_type"] in QUESTION_TYPES and line["difficulty"] in DIFFICULTIES
        assert row["model"] == "SmolLM2-135M-Instruct" and row["completion_tokens"] > 0
