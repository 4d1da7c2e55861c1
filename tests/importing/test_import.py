"""``embed-factory import``: every layout, broken inputs as one-line errors, --skip-invalid, S3, resume after
a crash, and a clean over an imported and a synthetic run whose export carries both."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flows.importing import ImportMismatch, import_run
from ground.settings import load_settings
from storage.atomic import StorageError
from storage.catalog import Catalog
from storage.lineage import read_lineage
from storage.shards import RunStore
from support.cli_process import cli
from support.rows import TOPICS, example, write_run
from tasks.importing.readers import ImportFileError, sample_path
from tasks.importing.shards import ImportOptions

PASSAGE = "A passage long enough to be a document about {topic}, with a few plain words in it."


def kalm(i: int, **extra) -> dict:
    return {
        "query": f"question {i} about topic {i}?",
        "pos": [PASSAGE.format(topic=i)],
        "neg": ["other " + PASSAGE.format(topic=i + 1)],
        **extra,
    }


def write_jsonl(path: Path, records: list, gz: bool = False) -> Path:
    text = "".join(r if isinstance(r, str) else json.dumps(r) + "\n" for r in records)
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    return path


def do_import(import_id: str, *paths, **options):
    return import_run(load_settings(), import_id, [str(p) for p in paths], ImportOptions(**options))


def lineage_rows(import_id: str) -> list[dict]:
    settings = load_settings()
    sql = "SELECT r.task_type, l.file, l.line, l.layout, l.source FROM raw r JOIN lineage l USING (example_id) "
    sql += "WHERE r.run_id = ? ORDER BY l.file, l.line"
    return Catalog.from_settings(settings).query(sql, [import_id]).to_pylist()


def test_the_bundled_sample_is_package_data_with_its_licence():
    import tomllib

    root = Path(__file__).resolve().parents[2]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = {p for pattern in patterns["tasks.importing"] for p in (root / "tasks/importing").glob(pattern)}
    readme = sample_path().parent / "README.md"
    assert {sample_path(), readme} <= shipped
    assert "CC0" in readme.read_text()
    assert sum(1 for line in sample_path().read_text().splitlines() if line.strip()) == 28  # as its README says


# --- layouts --------------------------------------------------------------------------------------------
def test_kalm_jsonl_maps_task_names_instructions_and_extra_texts(data_dir, tmp_path):
    path = write_jsonl(
        tmp_path / "kalm.jsonl.gz",
        [
            kalm(1, task_name="sts"),
            kalm(2, task_name="msmarco"),  # not one of the six: the default task type
            "\n",  # a blank line is no record, but counts as a line
            {**kalm(3), "pos": ["first positive text here", "second positive"], "neg": ["n1", "n2", "n3"]},
            {**kalm(4), "query": "Instruct: Find the passage.\nQuery: what is four?", "prompt": "ignored"},
            kalm(5, instruction="Retrieve a passage."),
        ],
        gz=True,
    )
    summary = do_import("imp-kalm", path, task_type="long_long")
    assert summary.rows == 5 and summary.layouts == {str(path): "kalm"}
    assert summary.by_type == {"sts": 1, "long_long": 4} and summary.texts_left_out == 3
    rows = {r["example_id"]: r for r in RunStore(data_dir, "imp-kalm").read_kind("examples").to_pylist()}
    by_line = {lin["line"]: rows[lin["example_id"]] for lin in read_lineage(RunStore(data_dir, "imp-kalm")).to_pylist()}
    assert sorted(by_line) == [1, 2, 4, 5, 6]  # file lines, the blank line 3 included
    assert by_line[4]["positive"] == "first positive text here" and by_line[4]["negative"] == "n1"
    assert json.loads(by_line[4]["parsed"]) == {"more_pos": ["second positive"], "more_neg": ["n2", "n3"]}
    assert (by_line[5]["instruction"], by_line[5]["query"]) == ("Find the passage.", "what is four?")
    assert by_line[6]["instruction"] == "Retrieve a passage." and by_line[1]["instruction"] is None
    assert {r["model"] for r in rows.values()} == {"imported"}
    assert [(r["line"], r["layout"], r["source"]) for r in lineage_rows("imp-kalm")] == [
        (line, "kalm", "imported") for line in (1, 2, 4, 5, 6)
    ]


def test_sentence_transformers_layouts_parquet_jsonl_and_datasets_folder(data_dir, tmp_path):
    from datasets import Dataset

    triplets = tmp_path / "triplets.parquet"
    pq.write_table(
        pa.table(
            {
                "anchor": [f"anchor {i}" for i in range(5)],
                "positive": [PASSAGE.format(topic=i) for i in range(5)],
                "negative_1": [None, "neg a", "neg b", "neg c", "neg d"],
                "negative_2": ["only neg", "neg a2", None, None, None],
            }
        ),
        triplets,
        row_group_size=2,  # several batches
    )
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"query": f"q{i}", "answer": PASSAGE.format(topic=i)} for i in range(3)])
    folder = tmp_path / "hf"
    Dataset.from_dict(
        {"query": ["hq0", "hq1"], "positive": ["hp0 " + PASSAGE, "hp1 " + PASSAGE], "negative": ["hn0", "hn1"]}
    ).save_to_disk(str(folder))

    summary = do_import("imp-st", triplets, qa, folder)
    assert summary.rows == 10
    assert summary.layouts == {str(triplets): "triplet", str(qa): "query_positive", str(folder): "query_positive"}
    table = RunStore(data_dir, "imp-st").read_kind("examples")
    got = {(r["query"], r["negative"]) for r in table.to_pylist()}
    assert {("anchor 0", "only neg"), ("anchor 1", "neg a"), ("q2", None), ("hq1", "hn1")} <= got
    lineage = [(r["file"], r["line"]) for r in lineage_rows("imp-st")]
    assert lineage == sorted(
        [(str(triplets), i) for i in range(1, 6)]
        + [(str(qa), i) for i in range(1, 4)]
        + [(str(folder), 1), (str(folder), 2)]
    )


# --- broken inputs ----------------------------------------------------------------------------------------
BROKEN = {
    "bad_json": ("b.jsonl", [kalm(1), kalm(2), '{"query": "x", "pos": [\n'], "b.jsonl:3: not valid JSON"),
    "missing_field": ("m.jsonl", [kalm(1), {"query": "q", "neg": ["n"]}], "m.jsonl:2: missing 'pos'"),
    "mistyped": ("t.jsonl", [{**kalm(1), "pos": "a string"}], "t.jsonl:1: 'pos' must be a list of strings, not str"),
    "not_object": ("o.jsonl", ["[1, 2]\n"], "o.jsonl:1: expected a JSON object, got list"),
    "empty": ("e.jsonl", ["\n"], "e.jsonl: empty file (no records)"),
    "unknown_layout": ("u.jsonl", [{"text": "t", "label": 1}], "u.jsonl:1: unknown layout (columns: label, text)"),
    "unknown_suffix": ("x.csv", ["a,b\n"], "x.csv: unknown file type"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_inputs_are_one_line_errors_and_leave_no_run(data_dir, tmp_path, case):
    name, records, message = BROKEN[case]
    path = write_jsonl(tmp_path / name, records)
    with pytest.raises(ImportFileError) as failure:
        do_import("imp-bad", path)
    assert str(failure.value).startswith(f"{path}") and message.split(":", 1)[1] in str(failure.value)
    assert "\n" not in str(failure.value)
    assert not (data_dir / "runs" / "imp-bad").exists(), "nothing half-imported"


def test_parquet_missing_column_and_datasets_dict_name_the_file(data_dir, tmp_path):
    from datasets import Dataset, DatasetDict

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"anchor": ["a"], "negative": ["n"]}), path)
    with pytest.raises(ImportFileError, match=r"p\.parquet: missing column 'positive' beside 'anchor'"):
        do_import("imp-p", path)
    dd = tmp_path / "dd"
    DatasetDict({"train": Dataset.from_dict({"query": ["q"], "positive": ["p"]})}).save_to_disk(str(dd))
    with pytest.raises(ImportFileError, match=r"a DatasetDict \(splits: train\); name one split's folder"):
        do_import("imp-dd", dd)


def test_cli_bad_line_is_one_error_line_exit_1(prefect_api_url, data_dir, tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [kalm(1), "not json\n", kalm(3)])
    done = cli("import", str(path), env={"PREFECT_API_URL": prefect_api_url})
    output = done.stdout + done.stderr
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert done.returncode == 1 and errors == [
        f"error: {path}:2: not valid JSON (Expecting value at column 1) (--skip-invalid skips such lines)"
    ], output
    assert "Traceback" not in output
    assert not (data_dir / "runs" / "import-bad").exists()


def test_skip_invalid_counts_and_keeps_rejects(data_dir, tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", [kalm(1), "{oops\n", kalm(3), {"query": 1, "pos": ["p"]}, kalm(5)])
    summary = do_import("imp-skip", path, skip_invalid=True, shard_rows=2)
    assert (summary.rows, summary.bad_lines) == (3, 2)
    assert summary.first_bad.startswith(f"{path}:2: not valid JSON")
    rejects = RunStore(data_dir, "imp-skip").read_kind("rejects").to_pylist()
    assert sorted(r["raw_text"].split(": ")[0] for r in rejects) == [f"{path}:2", f"{path}:4"]
    assert {r["stage"] for r in rejects} == {"import"}
    assert [r["line"] for r in lineage_rows("imp-skip")] == [1, 3, 5]


# --- S3 -----------------------------------------------------------------------------------------------------
def test_import_from_and_to_s3(s3_endpoint, monkeypatch, tmp_path):
    import uuid

    import s3fs

    from storage.location import data_root
    from support.s3_server import AWS_ENV, BUCKET

    for key, value in AWS_ENV.items():
        monkeypatch.setenv(key, value)
    prefix = f"{BUCKET}/{uuid.uuid4().hex[:10]}"
    monkeypatch.setenv("EMBED_FACTORY_STORAGE__DATA_DIR", f"s3://{prefix}/data")
    monkeypatch.setenv("EMBED_FACTORY_STORAGE__ENDPOINT_URL", s3_endpoint)
    fs = s3fs.S3FileSystem(endpoint_url=s3_endpoint, skip_instance_cache=True)
    fs.pipe_file(f"{prefix}/in/a.jsonl", "".join(json.dumps(kalm(i)) + "\n" for i in range(3)).encode())
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"query": ["pq"], "positive": [PASSAGE.format(topic="s3")]}), sink)
    fs.pipe_file(f"{prefix}/in/b.parquet", sink.getvalue().to_pybytes())

    summary = do_import("imp-s3", f"s3://{prefix}/in")  # a folder: its files, by name
    assert summary.rows == 4
    root = data_root(load_settings().storage)
    assert RunStore(root, "imp-s3").read_kind("examples").num_rows == 4
    files = [(r["file"], r["line"]) for r in lineage_rows("imp-s3")]
    assert files == [(f"s3://{prefix}/in/a.jsonl", i) for i in (1, 2, 3)] + [(f"s3://{prefix}/in/b.parquet", 1)]

    fs.pipe_file(f"{prefix}/bad/x.jsonl", (json.dumps(kalm(1)) + "\nnot json\n").encode())
    with pytest.raises(ImportFileError, match=r"x\.jsonl:2: not valid JSON"):
        do_import("imp-s3-bad", f"s3://{prefix}/bad/x.jsonl")
    assert not fs.exists(f"{prefix}/data/runs/imp-s3-bad/run.json"), "nothing half-imported on S3 either"
    assert fs.exists(f"{prefix}/data/runs/imp-s3/run.json")


# --- crashes and re-runs ------------------------------------------------------------------------------------
def _comparable(store: RunStore) -> tuple[list, list]:
    rows = store.read_kind("examples").drop_columns(["created_at"]).to_pylist()
    return rows, read_lineage(store).to_pylist()


def test_crash_after_two_shards_then_rerun_equals_an_uninterrupted_import(data_dir, tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "c.jsonl", [kalm(i) for i in range(11)])
    written = []
    original = RunStore.write_shard

    def crashing(self, kind, shard_id, rows, rejects):
        if len(written) == 2:
            raise OSError("simulated crash")
        written.append(shard_id)
        return original(self, kind, shard_id, rows, rejects)

    monkeypatch.setattr(RunStore, "write_shard", crashing)
    with pytest.raises(OSError, match="simulated crash"):
        do_import("imp-c", path, shard_rows=3)
    monkeypatch.setattr(RunStore, "write_shard", original)
    assert (
        sorted(p.stem for p in (data_dir / "runs/imp-c/examples").glob("*.parquet"))
        == written
        == ["imp-00000", "imp-00001"]
    )

    resumed = do_import("imp-c", path, shard_rows=3)
    assert (resumed.shards_skipped, resumed.shards_written, resumed.rows) == (2, 2, 11)

    monkeypatch.setenv("EMBED_FACTORY_STORAGE__DATA_DIR", str(tmp_path / "fresh"))
    do_import("imp-c", path, shard_rows=3)
    assert _comparable(RunStore(data_dir, "imp-c")) == _comparable(RunStore(tmp_path / "fresh", "imp-c"))


def test_kill_9_mid_import_then_rerun_resumes(prefect_api_url, data_dir, tmp_path):
    path = write_jsonl(tmp_path / "k.jsonl", [kalm(i) for i in range(10)])
    env = {"PREFECT_API_URL": prefect_api_url, "EMBED_FACTORY_FAULT_KILL_AT": "shard.data:2"}
    killed = cli("import", str(path), "--shard-rows", "3", env=env)  # SIGKILL: data file written, no manifest entry
    assert killed.returncode == -9, killed.stderr
    store = RunStore(data_dir, "import-k")
    assert sorted(store.manifest()) == ["examples/imp-00000"]
    resumed = do_import("import-k", path, shard_rows=3)  # the same run, resumed in this process (saves a CLI start)
    assert (resumed.rows, resumed.shards_skipped, resumed.shards_written) == (10, 2, 2)
    assert sorted(store.manifest()) == [f"examples/imp-0000{i}" for i in range(4)]  # the killed shard recovered
    assert store.read_kind("examples").num_rows == len(read_lineage(store)) == 10


def test_rerun_with_other_options_or_a_generation_run_id_is_refused(data_dir, tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [kalm(1)])
    do_import("imp-r", path)
    with pytest.raises(ImportMismatch, match="imported from other inputs or with other options"):
        do_import("imp-r", path, task_type="sts")
    write_run(data_dir, "gen-a", [example("gen-a", 0, TOPICS[0][0], TOPICS[0][1], TOPICS[1][1])])
    with pytest.raises(ImportMismatch, match="'gen-a' already holds shards and is no import"):
        do_import("gen-a", path)
    RunStore(data_dir, "gen-a").write_run_info({"fingerprint": {}})  # as the generate flow records a run
    with pytest.raises(ImportMismatch, match="'gen-a' is a generation run"):
        do_import("gen-a", path)
    with RunStore(data_dir, "imp-r").exclusive():  # another process writing it
        with pytest.raises(StorageError, match="run 'imp-r' is being written by another process.*--import-id"):
            do_import("imp-r", path)
    assert RunStore(data_dir, "imp-r").read_kind("examples").num_rows == 1  # the refused re-runs changed nothing
    assert RunStore(data_dir, "gen-a").read_kind("examples").num_rows == 1


# --- one clean over imported and synthetic rows ---------------------------------------------------------------
def test_clean_over_an_imported_and_a_synthetic_run_exports_both(prefect_api_url, data_dir, monkeypatch):
    from flows.clean import clean
    from storage.corpus import CleanStore

    # decontamination treats every row alike; embedding its eval texts (thousands of STS sentences) would be
    # most of this test's time, so it is off here (tests/cleaning covers it)
    tiny = {"NEGATIVES_PER_QUERY": "2", "NEGATIVE_RANK_MIN": "1", "NEGATIVE_RANK_MAX": "10", "DECONTAMINATE": "false"}
    for key, value in tiny.items():
        monkeypatch.setenv(f"EMBED_FACTORY_CLEAN__{key}", value)
    rows = [example("synth", i, q, p, negative=TOPICS[(i + 1) % len(TOPICS)][1]) for i, (q, p) in enumerate(TOPICS)]
    write_run(data_dir, "synth", rows)
    imported = do_import("imp-sample", sample_path())
    assert imported.rows == 28

    summary = clean(clean_id="c-mix")
    assert summary.runs == ["imp-sample", "synth"] and summary.counts["raw"] == 28 + len(TOPICS)
    catalog = Catalog(data_dir)
    dropped = catalog.query(
        "SELECT d.stage, d.reason FROM dropped d JOIN lineage USING (example_id) WHERE d.stage = 'validate'"
    ).to_pylist()
    assert dropped == [], "validation drops no imported row for lacking generation-only fields"
    store = CleanStore(data_dir, "c-mix")
    exported = [
        json.loads(line)
        for split in ("train", "heldout")
        for line in (store.export_dir / f"{split}.jsonl").read_text().splitlines()
    ]
    runs = {record["example_id"].split(":")[0] for record in exported}
    assert runs == {"imp-sample", "synth"}
    ids = [r["example_id"] for r in exported if r["example_id"].startswith("imp-sample:")]
    traced = catalog.query(
        "SELECT example_id, file, line FROM lineage WHERE list_contains(?, example_id)", [ids]
    ).to_pylist()
    assert len(traced) == len(ids) and {r["file"] for r in traced} == {str(sample_path())}


def test_a_missing_input_is_one_line_naming_it(tmp_path):
    from tasks.importing.readers import resolve_sources

    with pytest.raises(ImportFileError, match=r"nowhere\.jsonl: not found$"):
        resolve_sources([str(tmp_path / "nowhere.jsonl")])
