"""Grounded generation's parts: reading a corpus (each kind, local and S3, bad files), passages and their ids,
persona retrieval with the real encoder, the config stage's schema and the plan."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ground.settings import CleanSettings
from llm.embedder import make_embedder
from prompts.grounded import DIFFICULTIES, QUESTION_TYPES, config_schema, render_config, render_query
from prompts.render import OutputInvalid, parse_output
from storage.documents import Document, corpus_files, read_documents
from storage.records import RecordFileError
from storage.schemas import PASSAGE_SCHEMA
from tasks.generation.grounded import plan_grounded
from tasks.generation.passages import (
    corpus_location,
    corpus_passages,
    passage_id,
    shipped_corpus_path,
    split_passages,
    top_personas,
)


def _words(n: int, stem: str = "word") -> str:
    return " ".join(f"{stem}{i}" for i in range(n))


def test_passages_hold_the_word_range_and_ids_are_hashes_of_the_text():
    text = "\n\n".join([_words(30, "a"), _words(50, "b"), _words(250, "c"), _words(12, "d")])
    passages = split_passages(Document("doc.md", text), 40, 100)
    assert all(40 <= p.words <= 100 for p in passages), [p.words for p in passages]
    assert sum(p.words for p in passages) == 30 + 50 + 250 + 12, "no word lost (the short tail joins the last)"
    assert [p.position for p in passages] == list(range(1, len(passages) + 1))
    assert all(p.passage_id == passage_id(p.text) for p in passages)
    # the id is of the words alone: another document name or whitespace gives the same id
    again = split_passages(Document("elsewhere/doc.md", text.replace("\n\n", "\n\n\n")), 40, 100)
    assert [p.passage_id for p in again] == [p.passage_id for p in passages]
    # a document shorter than the minimum gives none; a repeated passage is one
    assert split_passages(Document("short.txt", _words(10)), 40, 100) == []
    unique, repeated = corpus_passages([Document("x", _words(60)), Document("y", _words(60))], 40, 100)
    assert len(unique) == 1 and repeated == 1


def _corpus(root):
    root.mkdir()
    (root / "a.txt").write_text(_words(80, "txt"))
    (root / "sub").mkdir()
    (root / "sub" / "b.md").write_text("# Title\n\n" + _words(80, "md"))
    (root / "c.html").write_text(
        f"<html><style>p {{}}</style><script>var x;</script><p>{_words(80, 'html')}</p></html>"
    )
    (root / "d.jsonl").write_text(json.dumps({"text": _words(80, "jsonl")}) + "\n")
    pq.write_table(pa.table({"text": [_words(80, "pq")], "id": [1]}), root / "e.parquet")
    (root / "image.png").write_bytes(b"\x89PNG")
    return root


def test_a_folder_of_each_document_kind_reads_in_path_order(tmp_path):
    files = corpus_files(str(_corpus(tmp_path / "docs")))
    assert files.skipped == 1  # the image
    docs = list(read_documents(files))
    assert [d.name for d in docs] == ["a.txt", "c.html", "d.jsonl#1", "e.parquet#1", "sub/b.md"]
    html = docs[1].text
    assert "html0" in html and "var x" not in html and "p {}" not in html


@pytest.mark.parametrize(
    "name, content, expected",
    [
        ("bad.jsonl", b'{"text": "ok"}\nnot json\n', "bad.jsonl:2: not valid JSON"),
        (
            "col.jsonl",
            b'{"body": "x"}\n',
            "col.jsonl:1: no column 'text' (has body); set generation.corpus_text_column",
        ),
        ("num.jsonl", b'{"text": 3}\n', "num.jsonl:1: 'text' must be a string, not int"),
        ("bin.txt", b"\xff\xfe\x00text", "bin.txt: not UTF-8 text (byte 0)"),
        ("x.docx", b"PK", "x.docx: unknown file type"),
    ],
)
def test_a_bad_file_is_one_line_naming_it(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(RecordFileError) as caught:
        list(read_documents(corpus_files(str(path))))
    assert expected in str(caught.value), caught.value
    assert "\n" not in str(caught.value)


def test_missing_and_empty_corpora_are_one_line(tmp_path):
    with pytest.raises(RecordFileError, match=r"nowhere: not found$"):
        corpus_files(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecordFileError, match="a folder with no .txt, .md, .html, .jsonl or .parquet files"):
        corpus_files(str(tmp_path / "empty"))


def test_an_s3_corpus_reads_like_a_local_one(s3_root, s3_endpoint):
    (s3_root / "docs" / "a.txt").write_text(_words(80, "s3txt"))
    (s3_root / "docs" / "d.jsonl").write_text(json.dumps({"text": _words(80, "s3jsonl")}) + "\n")
    url = f"s3://{s3_root.path.strip('/')}/docs"
    docs = list(read_documents(corpus_files(url, {"endpoint_url": s3_endpoint})))
    assert [d.name for d in docs] == ["a.txt", "d.jsonl#1"]
    assert docs[1].text.startswith("s3jsonl0")


def test_the_shipped_corpus_is_small_licensed_and_cuts_into_passages():
    folder = shipped_corpus_path()
    assert corpus_location("python-docs") == str(folder)
    size = sum(p.stat().st_size for p in folder.iterdir())
    assert size < 1_000_000
    assert "Python Software Foundation License" in (folder.parent / "README.md").read_text()
    passages, _ = corpus_passages(read_documents(corpus_files(str(folder))), 60, 200)
    assert len(passages) >= 100 and all(60 <= p.words <= 200 for p in passages)


PERSONAS = [
    "a marine biologist who dives to study coral reef bleaching and fish populations",
    "a jazz pianist who teaches improvisation and harmony to conservatory students",
    "a tax accountant who prepares small business returns and payroll filings",
    "a Python developer who maintains a web framework and reviews pull requests",
    "a pastry chef who runs a bakery known for croissants and sourdough bread",
]


def test_persona_retrieval_picks_the_persona_a_passage_is_about():
    """The real encoder (clean.embedder, all-MiniLM-L6-v2): each passage, written about one persona's
    subject without naming the persona, has that persona first."""
    passages = [
        "Warming seas stress the corals, which expel their algae and turn white; reef fish lose shelter and food.",
        "Voicings built on the seventh chord give a soloist room; comping behind a bass line keeps the swing.",
        "Quarterly estimated payments and deductible expenses decide what a sole proprietor owes the revenue office.",
        "Every pull request to the framework needs a passing test suite; reviewers read the Python code.",
        "Laminated dough is folded with cold butter many times so that the layers rise and flake in the oven.",
    ]
    embedder = make_embedder(CleanSettings())
    indices, scores = top_personas(embedder.encode(passages), embedder.encode(PERSONAS), k=3)
    assert indices.shape == (5, 3)
    assert indices[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert np.all(np.diff(scores, axis=1) <= 0), "best first"


def test_top_personas_in_blocks_equals_one_block():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((50, 8)).astype(np.float32), rng.standard_normal((30, 8)).astype(np.float32)
    one = top_personas(a, b, 5, block=1000)
    blocked = top_personas(a, b, 5, block=7)
    assert np.array_equal(one[0], blocked[0]) and np.allclose(one[1], blocked[1])
    assert np.array_equal(one[0], np.argsort(-(a @ b.T), axis=1)[:, :5])


def test_the_config_answer_is_held_to_its_schema():
    prompt = render_config("Some passage text.", PERSONAS[:3])
    assert "3. " + PERSONAS[2] in prompt.messages[0]["content"]
    good = {"persona": "2", "question_type": "yes_or_no", "difficulty": "PhD"}
    assert parse_output(json.dumps(good), prompt.schema) == good
    for bad in (
        {**good, "persona": "4"},  # only three candidates
        {**good, "question_type": "trivia"},
        {**good, "difficulty": "kindergarten"},
        {**good, "extra": "x"},
        {k: v for k, v in good.items() if k != "difficulty"},
    ):
        with pytest.raises(OutputInvalid):
            parse_output(json.dumps(bad), prompt.schema)
    schema = config_schema(5)["properties"]
    assert schema["question_type"]["enum"] == list(QUESTION_TYPES)
    assert schema["difficulty"]["enum"] == list(DIFFICULTIES)
    query = render_query("P", "a persona", "keywords", "PhD", {"query_length": "5 to 15 words", "language": "German"})
    text = query.messages[0]["content"]
    assert "5 to 15 words" in text and "in German" in text and QUESTION_TYPES["keywords"] in text


def _passages_table(n: int) -> pa.Table:
    return pa.table(
        {
            "passage_id": [f"p-{i:04d}" for i in range(n)],
            "document": [f"doc{i % 3}.txt" for i in range(n)],
            "position": [i + 1 for i in range(n)],
            "words": [80] * n,
            "text": [f"passage {i}" for i in range(n)],
            "personas": [["a", "b"]] * n,
            "persona_scores": [[0.9, 0.8]] * n,
        },
        schema=PASSAGE_SCHEMA,
    )


def test_the_plan_takes_each_passage_once_in_a_seeded_order():
    table = _passages_table(30)
    personas = {"a": "persona a", "b": "persona b"}
    shards = plan_grounded("r", table, personas, 20, seed=3, shard_size=6)
    requests = [r for s in shards for r in s.requests]
    assert [len(s.requests) for s in shards] == [6, 6, 6, 2]
    assert len({r.passage_id for r in requests}) == 20
    assert requests == [r for s in plan_grounded("r", table, personas, 20, 3, 6) for r in s.requests]
    assert [r.passage_id for r in requests] != [
        r.passage_id for s in plan_grounded("r", table, personas, 20, 4, 6) for r in s.requests
    ]
    for r in requests:  # the negative is a passage of another document
        assert r.negative != r.passage and r.negative is not None
        other = int(r.negative.split()[1])
        assert other % 3 != int(r.document[3])
        assert set(r.placeholders) == {"query_length", "language"}
    only = plan_grounded("r", table, personas, 100, 3, 50, {"language": ["English"]})
    assert sum(len(s.requests) for s in only) == 30
    assert {r.placeholders["language"] for s in only for r in s.requests} == {"English"}


def test_the_cli_refuses_a_missing_corpus_in_one_line_before_any_server(tmp_path):
    from support.cli_process import cli

    env = {"EMBED_FACTORY_STORAGE__DATA_DIR": str(tmp_path / "data"), "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    result = cli("run", "--corpus", str(tmp_path / "nowhere"), "--no-clean", env=env, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: {tmp_path / 'nowhere'}: not found"], result.stderr


def test_the_cli_refuses_other_task_types_with_a_corpus(tmp_path):
    from support.cli_process import cli

    env = {"EMBED_FACTORY_STORAGE__DATA_DIR": str(tmp_path / "data"), "PREFECT_API_URL": "http://127.0.0.1:9/api"}
    result = cli("run", "--corpus", "python-docs", "--task-type", "sts", "--no-clean", env=env, timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: --task-type does not apply to --corpus: a grounded run writes retrieval rows only"], lines
