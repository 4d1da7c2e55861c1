"""A grounded run end to end on the production-length double: the shipped corpus → one query per passage →
the clean → the export, with passage, persona, question type and difficulty as lineage all the way."""

from __future__ import annotations

import asyncio
import json

import pyarrow.parquet as pq
import pytest

from prompts.grounded import DIFFICULTIES, QUESTION_TYPES
from storage.catalog import Catalog
from storage.lineage import read_lineage
from storage.passages import read_passages
from storage.shards import RunStore

EXAMPLES = 24
#: query words per asked length (the retrieval type's query_length values)
LENGTHS = {"less than 5 words": (1, 4), "5 to 15 words": (5, 15), "at least 10 words": (10, 40)}


@pytest.fixture
def prod_stub(monkeypatch):
    from support.prod_stub_llm import ProdStubLLM

    with ProdStubLLM(seed=3, invalid_per_mille=0, duplicate_per_mille=0) as server:
        for key, value in {
            "LLM__BASE_URL": server.base_url,
            "LLM__MODEL": server.model,
            "GENERATION__SHARD_SIZE": "8",
            "PERSONAS__LIMIT": "60",
            "GENERATION__PLACEHOLDER_OVERRIDES": json.dumps({"retrieval": {"language": ["English", "German"]}}),
            "CLEAN__RANK_TOP_K": "20",
            "CLEAN__NEGATIVE_RANK_MIN": "5",
            "CLEAN__NEGATIVE_RANK_MAX": "30",
            "CLEAN__NEGATIVES_PER_QUERY": "2",
            "CLEAN__DECONTAMINATE": "false",
        }.items():
            monkeypatch.setenv(f"EMBED_FACTORY_{key}", value)
        yield server


def test_a_grounded_run_generates_one_query_per_passage_with_lineage_through_the_clean(
    prefect_api_url, data_dir, prod_stub
):
    from flows.clean import clean
    from flows.generate import generate

    summary = asyncio.run(generate(run_id="grounded", examples=EXAMPLES, seed=3, corpus="python-docs"))
    assert summary.examples_by_type == {"retrieval": EXAMPLES}, summary
    assert not summary.warnings, summary.warnings

    store = RunStore(data_dir, "grounded")
    passages = {p["passage_id"]: p for p in read_passages(store).to_pylist()}
    rows = store.read_kind("examples").to_pylist()
    lineage = {r["example_id"]: r for r in read_lineage(store).to_pylist()}
    assert len(rows) == EXAMPLES and set(lineage) == {r["example_id"] for r in rows}
    assert len({lineage[r["example_id"]]["passage_id"] for r in rows}) == EXAMPLES, "each passage once"
    for row in rows:
        line = lineage[row["example_id"]]
        passage = passages[line["passage_id"]]
        assert row["positive"] == passage["text"], "the positive is the source passage"
        assert row["negative"] and row["negative"] != row["positive"]
        assert line["source"] == "grounded" and (line["file"], line["line"]) == (
            passage["document"],
            passage["position"],
        )
        assert row["persona_id"] in passage["personas"], "the chosen persona is one of the passage's top k"
        assert line["question_type"] in QUESTION_TYPES and line["difficulty"] in DIFFICULTIES
        asked = json.loads(row["placeholders"])
        assert (asked["question_type"], asked["difficulty"]) == (line["question_type"], line["difficulty"])
        low, high = LENGTHS[asked["query_length"]]
        assert low <= len(row["query"].split()) <= high, (asked, row["query"])
    assert len(passages) > EXAMPLES  # at most `examples` of the corpus' passages

    # queryable in DuckDB, as `embed-factory query` asks it
    catalog = Catalog(data_dir)
    counted = catalog.query(
        "SELECT question_type, difficulty, count(*) AS n FROM raw JOIN lineage USING (example_id) "
        "WHERE source = 'grounded' GROUP BY ALL"
    ).to_pylist()
    assert sum(r["n"] for r in counted) == EXAMPLES
    assert catalog.query("SELECT count(*) AS n FROM passages").to_pylist()[0]["n"] == len(passages)

    result = clean(clean_id="grounded-clean")
    export = data_dir / "clean" / "grounded-clean" / "export" / "train.parquet"
    exported = pq.read_table(export).to_pylist()
    assert exported, "grounded rows reach the export"
    for record in exported:  # the export's example_id leads back to the passage
        line = lineage[record["example_id"]]
        assert record["pos"][0] == passages[line["passage_id"]]["text"]
    joined = catalog.query(
        f"SELECT l.passage_id, l.question_type, l.difficulty FROM read_parquet('{export}') e "
        "JOIN lineage l USING (example_id)"
    ).to_pylist()
    assert len(joined) == len(exported) and all(r["passage_id"] and r["question_type"] for r in joined)
    report = (data_dir / "clean" / "grounded-clean" / "report.html").read_text()
    section = report.split('id="grounded"')[1].split("</section>")[0]
    for question_type in {r["question_type"] for r in counted}:
        assert question_type in section
    assert result is not None
