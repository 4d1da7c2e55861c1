"""Decontamination: planted STS-B test sentences (verbatim and lightly edited) are dropped with their source
and row; hand-written clean rows are kept; user files are read as eval sources."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ground.settings import CleanSettings
from llm.embedder import SentenceTransformerEmbedder
from storage.eval_files import read_eval_file
from tasks.cleaning.decontaminate import EvalText, decontaminate, ngrams
from tasks.training.eval_data import bundled_sts_dir, load_sts

CLEAN_QUERIES = [
    "How do I descale an espresso machine with citric acid?",
    "best budget trail running shoes for muddy terrain",
    "Which houseplants tolerate low light in a north-facing flat?",
    "What does a 403 error mean when uploading files to S3?",
    "symptoms of vitamin D deficiency in teenagers",
    "How long should sourdough bulk fermentation take at 20 degrees?",
    "compare fixed and variable mortgage rates for first-time buyers",
    "Why does my bike chain skip under load after replacing the cassette?",
]
CLEAN_POSITIVES = [
    "Dissolve two tablespoons of citric acid in a litre of water and run it through the boiler.",
    "Look for aggressive lugs, a rock plate and a drop under 8 mm for muddy trails.",
    "Snake plants, ZZ plants and pothos cope well with low light and irregular watering.",
    "A 403 from S3 usually means the bucket policy or the IAM role denies the PutObject action.",
    "Fatigue, bone pain, muscle weakness and frequent infections are common signs.",
    "At 20 degrees bulk fermentation usually needs six to eight hours until the dough has risen by half.",
    "A fixed rate keeps payments stable; a variable rate follows the central bank and can fall or rise.",
    "A worn chain on new cogs slips: replace the chain together with the cassette.",
]


def edit(sentence: str, k: int) -> str:
    """A light edit of an eval sentence: one of four kinds a generator might produce."""
    words = sentence.rstrip(".").split()
    if k % 4 == 0:
        return sentence.lower().rstrip(".")  # case and punctuation
    if k % 4 == 1:
        words[len(words) // 2] = "some"  # one word replaced
        return " ".join(words) + "."
    if k % 4 == 2:
        return "Someone said that " + sentence[0].lower() + sentence[1:]  # a prefix
    return " ".join(words[:-1]) + " " + words[-1] + " today."  # a word added at the end


def rows_table(queries: list[str], positives: list[str]) -> pa.Table:
    n = len(queries)
    return pa.table(
        {
            "example_id": [f"r:{i:03d}" for i in range(n)],
            "run_id": ["r"] * n,
            "task_type": ["retrieval"] * n,
            "query": queries,
            "positive": positives,
        }
    )


@pytest.fixture(scope="module")
def sts_eval() -> list[EvalText]:
    s1, s2, _ = load_sts(bundled_sts_dir(), "en")
    return [EvalText("stsb-en-test", row, t) for row, pair in enumerate(zip(s1, s2, strict=True)) for t in pair]


def test_ngrams_casefold_and_short_texts():
    assert ngrams("A man, a PLAN", 3) == {("a", "man", "a"), ("man", "a", "plan")}
    assert ngrams("Hello world", 3) == {("hello", "world")}
    assert ngrams("", 3) == set()


def test_planted_sts_sentences_are_dropped_with_source_and_row(sts_eval, capsys):
    s1, s2, _ = load_sts(bundled_sts_dir(), "en")
    rows = [r for r in range(0, len(s1), 23) if len(s1[r].split()) >= 7][:16]
    assert len(rows) == 16
    verbatim, edited = rows[:8], rows[8:]
    # planted: 8 verbatim queries, 4 edited queries, 4 edited sentences as positives; then 8 clean rows
    queries = [s1[r] for r in verbatim] + [edit(s1[r], k) for k, r in enumerate(edited[:4])] + CLEAN_QUERIES[:4]
    positives = CLEAN_POSITIVES + CLEAN_POSITIVES[:4] + [edit(s1[r], k) for k, r in enumerate(edited[4:])]
    planted = {f"r:{i:03d}": r for i, r in enumerate(verbatim + edited)}
    queries += CLEAN_QUERIES
    positives += CLEAN_POSITIVES
    table = rows_table(queries, positives)
    embedder = SentenceTransformerEmbedder(batch_size=32)
    result = decontaminate(table, sts_eval, CleanSettings(), embedder.encode)
    dropped = {r["example_id"]: r for r in result.dropped.to_pylist()}
    caught = [i for i in planted if i in dropped]
    recall = len(caught) / len(planted)
    with capsys.disabled():
        print(
            f"\nplanted contamination recall: {len(caught)}/{len(planted)} = {recall:.2f}; "
            f"clean rows dropped: {len(set(dropped) - set(planted))}/{len(CLEAN_QUERIES)}"
        )
    assert recall == 1.0, {i: planted[i] for i in planted if i not in dropped}
    for example_id, row in planted.items():
        d = dropped[example_id]
        assert d["stage"] == "decontaminate" and d["reason"] == "contaminated"
        # the first row that holds the planted sentence (STS-B repeats some sentences)
        first = min(i for i, pair in enumerate(zip(s1, s2, strict=True)) if s1[row] in pair)
        assert f"stsb-en-test row {first} " in d["detail"], d["detail"]
    assert set(dropped) == set(planted), "a clean row was dropped"
    assert sorted(result.kept["example_id"].to_pylist()) == sorted(set(table["example_id"].to_pylist()) - set(planted))


def test_ngram_check_alone_catches_verbatim_and_keeps_clean(sts_eval):
    s1, s2, _ = load_sts(bundled_sts_dir(), "en")
    table = rows_table([CLEAN_QUERIES[0], CLEAN_QUERIES[1]], [CLEAN_POSITIVES[0], s2[700]])
    result = decontaminate(table, sts_eval, CleanSettings(decontaminate_similarity=None))
    assert result.dropped["example_id"].to_pylist() == ["r:001"]
    assert "positive matches stsb-en-test row 700 (ngram overlap 1.00)" in result.dropped["detail"][0].as_py()


def test_user_files_are_eval_sources(tmp_path):
    secret = "The quarterly revenue of the harbour authority rose by nine percent in spring."
    (tmp_path / "bench.jsonl").write_text(
        json.dumps({"id": 1, "text": "unrelated"}) + "\n" + json.dumps({"text": secret}) + "\n"
    )
    (tmp_path / "bench.csv").write_text("sentence1,score\nNothing here to see at all today,1\n" + f'"{secret}",2\n')
    pq.write_table(pa.table({"question": ["a", secret]}), tmp_path / "bench.parquet")
    columns = CleanSettings().decontaminate_columns
    for name in ("bench.jsonl", "bench.csv", "bench.parquet"):
        texts = [EvalText(name, row, t) for row, t in read_eval_file(tmp_path / name, columns)]
        result = decontaminate(rows_table([secret.upper()], ["x y z"]), texts, CleanSettings(), None)
        assert result.dropped["detail"].to_pylist() == [f"query matches {name} row 1 (ngram overlap 1.00)"], name
