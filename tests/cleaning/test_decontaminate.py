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
    assert "positive matches stsb-en-test row 700 (ngram overlap 1.00, " in result.dropped["detail"][0].as_py()


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
        want = f"query matches {name} row 1 (ngram overlap 1.00, 11 3-grams)"
        assert result.dropped["detail"].to_pylist() == [want], name


def test_a_short_eval_text_needs_to_be_contained_whole(sts_eval):
    """stsb-en-test row 675 is "There is no maximum.": two trigrams, which ordinary prose shares."""
    assert any(t.row == 675 and t.text == "There is no maximum." for t in sts_eval)
    prose_rows = [
        "There is no reason to wait: the council approved the budget and there is no upper age limit for applicants.",
        "In practice there is no easy answer, and there is no doubt that the price of bread has risen.",
        "There is no maximum.",  # the eval text itself
        "Officials said there is no maximum on the number of permits a farmer may hold this year.",
    ]
    table = rows_table(prose_rows, ["A plain answer about something else entirely, written for the test."] * 4)
    result = decontaminate(table, sts_eval, CleanSettings(decontaminate_similarity=None))
    details = dict(zip(result.dropped["example_id"].to_pylist(), result.dropped["detail"].to_pylist(), strict=True))
    assert set(details) == {"r:002", "r:003"}, details  # contained word for word, not shared trigrams
    assert all("stsb-en-test row 675 (contained" in d for d in details.values()), details


def test_shared_ngrams_scattered_over_a_document_are_no_evidence():
    eval_text = EvalText("bench", 0, "The quarterly revenue of the harbour authority rose by nine percent in spring.")
    words = eval_text.text.rstrip(".").split()
    filler = "Many other things happened in the meantime and nobody wrote them down at all. " * 4
    scattered = filler.join(" ".join(words[i : i + 3]) + "." for i in range(0, len(words), 3))
    local = "Reports say " + eval_text.text.lower() + " " + filler
    result = decontaminate(rows_table([scattered, local], ["x y z", "x y z"]), [eval_text], CleanSettings(), None)
    assert result.dropped["example_id"].to_pylist() == ["r:001"]


def test_an_eval_text_of_few_words_matches_only_the_same_words():
    eval_text = EvalText("bench", 0, "Yes, it is.")
    rows = rows_table(["yes it is", "Yes, it is a long way to the station, and yes, it is raining."], ["a b", "a b"])
    result = decontaminate(rows, [eval_text], CleanSettings(), None)
    assert result.dropped["example_id"].to_pylist() == ["r:000"]


def test_false_positive_rate_on_clean_production_length_prose(sts_eval):
    """<= 0.5 % of clean rows (queries of 8-25 words, documents of 50-520 in 18 languages, as the production
    stub writes them) are dropped by the n-gram check against every bundled STS-B test split."""
    from decontaminate import clean_rows, legacy_dropped, sts_eval_texts

    rows, evals = clean_rows(1000, seed=11), sts_eval_texts()
    result = decontaminate(rows, evals, CleanSettings(decontaminate_similarity=None))
    assert result.dropped.num_rows <= 0.005 * rows.num_rows, result.dropped["detail"].to_pylist()[:5]
    # the same rows under the rule before: the test can fail on prose that shares common phrases
    assert legacy_dropped(rows, evals) > 0.05 * rows.num_rows


def test_blocked_pair_scoring_decides_as_the_per_pair_copies_did(sts_eval, tmp_path, monkeypatch):
    """Candidate pairs as int32 ids scored in blocks (here 7 pairs), over a memory-mapped matrix: the same
    matches, in the same words, as the code that copied two vectors per pair (bench/vectors_before.py)."""
    from clean_growth import HashBagEmbedder
    from growth_rows import synthetic_rows
    from vectors_before import old_find_matches

    from storage.embedding_cache import EmbeddingCache, encode_to_file
    from tasks.cleaning import decontaminate as decon

    s1, _, _ = load_sts(bundled_sts_dir(), "en")
    rows = synthetic_rows(400, "r", seed=3)
    for k, i in enumerate(range(0, 400, 20)):  # edited eval sentences: matched by n-grams or by cosine
        rows[i]["query"] = edit(s1[k * 7], k)
    table = pa.Table.from_pylist(rows)
    cfg = CleanSettings(decontaminate_similarity=0.6)
    index = decon.EvalIndex.build(sts_eval, cfg.decontaminate_ngram)
    embedder, asked = HashBagEmbedder(), []

    def encode_old(texts):
        asked.append(list(texts))
        return embedder.encode(texts)

    def encode_new(texts):
        asked.append(list(texts))
        return encode_to_file(texts, embedder, EmbeddingCache(tmp_path / "emb"), tmp_path / "decon.npy")

    before = old_find_matches(table, index, cfg, encode_old)
    monkeypatch.setattr(decon, "PAIR_BLOCK", 7)
    after = decon.find_matches(table, index, cfg, encode_new)
    assert after == before
    assert asked[0] == asked[1]  # the same texts embedded, in the same order
    hows = [m.how.split()[0] for m in after.values()]
    assert hows.count("cosine") >= 5 and len(hows) - hows.count("cosine") >= 5, hows
    assert len(asked[0]) > 7 * 3  # several blocks
