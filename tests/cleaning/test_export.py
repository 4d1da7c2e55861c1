"""Export of the mined corpus: record form, negatives, the held-out split, sentence-transformers
columns, the dataset card and publishing (local folder, and the Hub through a fake HfApi)."""

from __future__ import annotations

import json
import logging
import random
from datetime import UTC, datetime
from pathlib import Path

import huggingface_hub
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ground.settings import CleanSettings
from storage.corpus import ExportWriter
from storage.schemas import EXAMPLE_SCHEMA, FILTER_COLUMNS, MINED_COLUMNS
from tasks.cleaning.export import ExportError, export_corpus, heldout_quota, select_negatives, write_dataset_card
from tasks.cleaning.publish import PublishError, publish_dataset

MINED_SCHEMA = EXAMPLE_SCHEMA
for _name, _type in FILTER_COLUMNS + MINED_COLUMNS:
    MINED_SCHEMA = MINED_SCHEMA.append(pa.field(_name, _type))

FILES = ["heldout.jsonl", "heldout.parquet", "heldout_st.parquet", "train.jsonl", "train.parquet", "train_st.parquet"]
TOKEN = "hf_TopSecretToken123"


def mined_row(example_id: str, task_type: str = "retrieval", **values) -> dict:
    row = {name: None for name in MINED_SCHEMA.names}
    row.update(
        example_id=example_id,
        run_id="r1",
        shard_id="g00",
        task_type=task_type,
        instruction=f"Given a question about {task_type}, retrieve passages that answer it",
        query=f"query {example_id}",
        positive=f"positive {example_id}",
        negative=f"negative {example_id}",
        model="m",
        attempts=1,
        prompt_tokens=10,
        completion_tokens=20,
        latency_s=0.5,
        created_at=datetime(2024, 5, 1, tzinfo=UTC),
        positive_rank=1,
        positive_score=0.9,
        hard_negatives=[f"hard {example_id} {k}" for k in range(8)],
        hard_negative_scores=[0.5] * 8,
    )
    row.update(values)
    return row


def mined_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=MINED_SCHEMA)


def corpus_rows() -> list[dict]:
    """60 retrieval, 40 sts, 20 bitext (= 1/fraction at 5 %) and 3 classification rows."""
    sizes = {"retrieval": 60, "sts": 40, "bitext": 20, "classification": 3}
    return [mined_row(f"r1:{t}-{i:03d}", t) for t, n in sizes.items() for i in range(n)]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_record_form_instruction_on_query_only_and_negatives(tmp_path):
    special = mined_row(
        "r1:special",
        instruction="  Find the answer  ",
        query="why is the sky blue?",
        positive="Rayleigh scattering.",
        negative="The sea reflects it.",
        hard_negatives=[
            "Hard one",
            "Rayleigh scattering.",
            " The sea reflects it. ",
            "Hard one",
            "",
            "  ",
            "Rayleigh scattering. ",
            "Hard two",
            "Hard three",
            "Hard four",
        ],
        hard_negative_scores=[0.5] * 10,
    )
    no_negatives = mined_row("r1:bare", negative=None, hard_negatives=None, hard_negative_scores=None)
    cfg = CleanSettings(negatives_per_query=3, heldout_fraction=0.0)
    result = export_corpus(mined_table([special, no_negatives]), tmp_path / "export", cfg)
    records = {r["example_id"]: r for r in read_jsonl(result.files["train.jsonl"])}
    assert records["r1:special"] == {
        "query": "Instruct: Find the answer\nQuery: why is the sky blue?",
        "pos": ["Rayleigh scattering."],
        # generated negative first; duplicates, blanks and the positive (even re-spaced) are gone; capped at 3
        "neg": ["The sea reflects it.", "Hard one", "Hard two"],
        "task_name": "retrieval",
        "example_id": "r1:special",
    }
    assert records["r1:bare"]["neg"] == []
    assert list(records["r1:bare"]) == ["query", "pos", "neg", "task_name", "example_id"]
    for record in records.values():
        assert "Instruct" not in record["pos"][0] and not any("Instruct" in n for n in record["neg"])
    # the Parquet file holds the very same records
    assert sorted(pq.read_table(result.files["train.parquet"]).to_pylist(), key=lambda r: r["example_id"]) == sorted(
        records.values(), key=lambda r: r["example_id"]
    )
    assert result.negatives["train"] == {0: 1, 3: 1}


def test_select_negatives_caps_and_never_returns_the_positive():
    assert select_negatives("p", "p", ["p", " p", "a", "b"], 5) == ["a", "b"]
    assert select_negatives("p", "g", ["a", "b", "c"], 2) == ["g", "a"]
    assert select_negatives("p", "g", ["a"], 0) == []


def test_split_is_deterministic_disjoint_complete_and_stratified(tmp_path):
    rows = corpus_rows()
    cfg = CleanSettings(heldout_fraction=0.05, seed=7)
    first = export_corpus(mined_table(rows), tmp_path / "a", cfg)
    shuffled = rows[:]
    random.Random(1).shuffle(shuffled)
    second = export_corpus(mined_table(shuffled), tmp_path / "b", cfg)

    def ids(result, split):
        return [r["example_id"] for r in read_jsonl(result.files[f"{split}.jsonl"])]

    train, heldout = ids(first, "train"), ids(first, "heldout")
    assert set(heldout) == set(ids(second, "heldout")) and set(train) == set(ids(second, "train"))
    assert not set(train) & set(heldout)
    assert sorted(train + heldout) == sorted(r["example_id"] for r in rows)
    assert first.counts["heldout"] == {"bitext": 1, "retrieval": 3, "sts": 2}  # round(n * 5 %); 3 rows: none
    assert first.counts["train"] == {"bitext": 19, "classification": 3, "retrieval": 57, "sts": 38}
    assert first.rows() == len(rows)
    other_seed = export_corpus(mined_table(rows), tmp_path / "c", CleanSettings(heldout_fraction=0.05, seed=8))
    assert set(ids(other_seed, "heldout")) != set(heldout)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == FILES  # no temp files left


def test_heldout_quota_rounds_and_keeps_training_rows():
    assert [heldout_quota(n, 0.05) for n in (0, 1, 10, 19, 20, 30, 100)] == [0, 0, 1, 1, 1, 2, 5]
    assert heldout_quota(2, 0.9) == 1 and heldout_quota(1, 0.5) == 0  # never every row of a type
    assert heldout_quota(1000, 0.0) == 0


def test_sentence_transformers_columns(tmp_path):
    rows = corpus_rows()[:5] + [mined_row("r1:short", negative=None, hard_negatives=["only one"])]
    result = export_corpus(mined_table(rows), tmp_path / "e", CleanSettings(negatives_per_query=4, heldout_fraction=0))
    st = pq.read_table(result.files["train_st.parquet"])
    assert st.column_names == ["anchor", "positive", "negative_1", "negative_2", "negative_3", "negative_4"]
    kalm = {r["example_id"]: r for r in read_jsonl(result.files["train.jsonl"])}
    by_anchor = {r["anchor"]: r for r in st.to_pylist()}
    short = by_anchor[kalm["r1:short"]["query"]]
    assert short == {
        "anchor": kalm["r1:short"]["query"],
        "positive": "positive r1:short",
        "negative_1": "only one",
        "negative_2": None,
        "negative_3": None,
        "negative_4": None,
    }
    full = by_anchor[kalm["r1:retrieval-000"]["query"]]
    assert [full[f"negative_{i}"] for i in range(1, 5)] == kalm["r1:retrieval-000"]["neg"]
    assert full["anchor"].startswith("Instruct: ") and not full["positive"].startswith("Instruct")
    assert pq.read_table(result.files["heldout_st.parquet"]).num_rows == 0


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(ExportError, match="positive"):
        export_corpus(mined_table([mined_row("a", positive=None)]), tmp_path / "x", CleanSettings())
    with pytest.raises(ExportError, match="more than once"):
        export_corpus(mined_table([mined_row("a"), mined_row("a")]), tmp_path / "x", CleanSettings())
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_an_export_that_fails_midway_leaves_the_previous_files(tmp_path, monkeypatch):
    out = tmp_path / "e"
    first = export_corpus(mined_table(corpus_rows()), out, CleanSettings(heldout_fraction=0.05))
    before = {name: path.read_bytes() for name, path in first.files.items()}
    writes = 0

    def failing_write(self, split, records, st_rows):  # the disk fills up after the first batch
        nonlocal writes
        writes += 1
        if writes > 1:
            raise OSError(28, "No space left on device")
        original_write(self, split, records, st_rows)

    original_write = ExportWriter.write
    monkeypatch.setattr(ExportWriter, "write", failing_write)
    rows = [mined_row(f"r2:retrieval-{i:03d}") for i in range(40)]
    with pytest.raises(OSError, match="No space"):
        export_corpus(mined_table(rows), out, CleanSettings(heldout_fraction=0.05))
    assert {name: path.read_bytes() for name, path in first.files.items()} == before
    assert sorted(p.name for p in out.iterdir()) == FILES  # no temp file left


@pytest.fixture
def export_dir(tmp_path) -> tuple[Path, object]:
    out = tmp_path / "export"
    result = export_corpus(mined_table(corpus_rows()), out, CleanSettings(heldout_fraction=0.05))
    write_dataset_card(
        out,
        result,
        {"model": "Qwen/Qwen2-72B-Instruct", "runs": ["r1"], "clean_id": "c1", "embedding_model": "all-MiniLM-L6-v2"},
    )
    return out, result


def test_dataset_card_has_license_configs_and_counts(export_dir):
    out, result = export_dir
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front["license"] == "cc-by-nc-sa-4.0"
    categories = set(front["task_categories"])
    assert {"text-retrieval", "sentence-similarity", "translation", "text-classification"} <= categories
    configs = {c["config_name"]: c for c in front["configs"]}
    assert configs["default"]["data_files"] == [
        {"split": "train", "path": "train.parquet"},
        {"split": "heldout", "path": "heldout.parquet"},
    ]
    assert configs["sentence-transformers"]["data_files"][0] == {"split": "train", "path": "train_st.parquet"}
    assert "| retrieval | 57 | 3 | 60 |" in text and "| classification | 3 | 0 | 3 |" in text
    assert f"**{result.rows()}**" in text
    assert "Qwen/Qwen2-72B-Instruct" in text and "Persona Hub" in text


def test_publish_to_a_local_path_copies_the_folder(export_dir, tmp_path):
    out, _ = export_dir
    dest = publish_dataset(out, str(tmp_path / "published"))
    assert sorted(p.name for p in Path(dest).iterdir()) == sorted(FILES + ["README.md"])
    assert (Path(dest) / "train.jsonl").read_bytes() == (out / "train.jsonl").read_bytes()
    again = publish_dataset(out, f"file://{tmp_path / 'via-url'}")
    assert (Path(again) / "README.md").exists()
    (out / "README.md").unlink()
    with pytest.raises(PublishError, match="card"):
        publish_dataset(out, str(tmp_path / "nocard"))


class FakeHfApi:
    calls: list[tuple[str, dict]] = []
    fail_with: Exception | None = None

    def __init__(self, token=None, **kwargs):
        FakeHfApi.calls.append(("init", {"token": token, **kwargs}))

    def create_repo(self, repo_id, **kwargs):
        FakeHfApi.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))

    def upload_folder(self, **kwargs):
        FakeHfApi.calls.append(("upload_folder", kwargs))
        if FakeHfApi.fail_with:
            raise FakeHfApi.fail_with
        return "commit"


def test_publish_to_the_hub_uses_a_dataset_repo_and_never_shows_the_token(export_dir, monkeypatch, capsys, caplog):
    out, _ = export_dir
    FakeHfApi.calls = []
    FakeHfApi.fail_with = None
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    caplog.set_level(logging.DEBUG)
    url = publish_dataset(out, "someone/embed-data", token=TOKEN)
    assert url == "https://huggingface.co/datasets/someone/embed-data"
    calls = dict(FakeHfApi.calls)
    assert calls["init"]["token"] == TOKEN
    assert calls["create_repo"]["repo_id"] == "someone/embed-data"
    assert calls["create_repo"]["repo_type"] == "dataset" and calls["create_repo"]["exist_ok"] is True
    assert calls["upload_folder"]["repo_type"] == "dataset"
    assert calls["upload_folder"]["repo_id"] == "someone/embed-data"
    assert Path(calls["upload_folder"]["folder_path"]) == out
    # a failure whose message echoes the token is reported without it
    FakeHfApi.fail_with = RuntimeError(f"401 Unauthorized for token {TOKEN}")
    with pytest.raises(PublishError) as info:
        publish_dataset(out, "someone/embed-data", token=TOKEN)
    assert TOKEN not in str(info.value) and "401" in str(info.value)
    assert info.value.__cause__ is None and info.value.__suppress_context__
    captured = capsys.readouterr()
    assert TOKEN not in captured.out + captured.err + caplog.text
    with pytest.raises(PublishError, match="owner/name"):
        publish_dataset(out, "not a repo id")


def test_streamed_export_is_byte_identical_to_the_whole_table(tmp_path):
    """The flow exports the committed table read back in batches (``ExportRows``; row groups of any size):
    the files equal, byte for byte, those of the whole table in memory."""
    from storage.stage_io import iter_table
    from tasks.cleaning.export import BATCH_ROWS, EXPORT_COLUMNS, KEY_COLUMNS, ExportRows

    types = ("retrieval", "sts", "classification")
    rows = [
        mined_row(f"e{i:05d}", types[i % 3], hard_negatives=[f"neg {i} {j}" for j in range(i % 4)])
        for i in range(2 * BATCH_ROWS + 123)
    ]
    table = mined_table(rows)
    whole = export_corpus(table, tmp_path / "whole", CleanSettings())
    source = tmp_path / "mined.parquet"
    pq.write_table(table, source, row_group_size=3001)
    streamed = ExportRows(
        table.schema,
        iter_table(source, columns=KEY_COLUMNS),
        iter_table(source, columns=[c for c in EXPORT_COLUMNS if c in table.column_names], batch_rows=BATCH_ROWS),
    )
    result = export_corpus(streamed, tmp_path / "streamed", CleanSettings())
    assert result.counts == whole.counts and result.rows("heldout") > 0
    for name in FILES:
        assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
