"""Every command of ``embed-factory --help`` against bad ids and bad data folders: one ``error:`` line, no
traceback, a non-zero exit code, and nothing created or changed (a hash of the whole temp tree, data
folder and working directory, before and after).

One row per command says, for each case, the arguments and the words the error must hold, or why the
case does not apply. The commands come from the Typer app itself, so a new command without a row fails
:func:`test_every_command_has_a_row`. In process (Typer's CliRunner): starting a server is a test failure
(both servers' ``start`` raise), so a command that would reach one before checking its input fails here.

"An unreadable file inside the data folder": the tests run as root, and chmod 000 does not stop root, so
the file is unreadable by content instead: garbage where a Parquet shard, a manifest or the DuckDB
catalog should be, or a folder where the training file should be.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from embed_factory.cli import app
from support.rows import make_export, make_generation_run

RUN, CLEAN = "run-20260101-000000-a1b2c3", "clean-20260101-000000"
CASES = ("unknown id", "malformed value", "missing data folder", "empty data folder", "data folder is a file")
CASES += ("unreadable file inside",)


def cli_commands(group=None, prefix: tuple[str, ...] = ()) -> list[tuple]:
    """Every command the app lists in ``--help``, sub-commands of groups (``llm up``) included."""
    found = []
    for name, command in sorted((group or typer.main.get_command(app)).commands.items()):
        if hasattr(command, "commands"):  # a group (Typer's own click: no click.Group isinstance)
            found += cli_commands(command, (*prefix, name))
        elif not command.hidden:
            found.append((*prefix, name))
    return found


# --- the damage of "unreadable file inside", per command: the file the command reads first ---------------
def garbage(relative: str):
    def damage(data: Path) -> None:
        (data / relative).write_bytes(b"\x00\x01 not what it should be")

    return damage


def folder_instead(relative: str):
    def damage(data: Path) -> None:
        (data / relative).unlink()
        (data / relative).mkdir()

    return damage


@dataclass
class Case:
    args: list[str]
    needle: str  # in the error line
    damage: object = None  # for "unreadable file inside": what to break in the data folder


@dataclass
class Row:
    cases: dict[str, Case]
    not_applicable: dict[str, str] = field(default_factory=dict)  # case -> why it does not apply


NO_ID = "takes no run id, clean id or deployment name"
A_FILE = "is a file, not a data folder"
NO_RUNS = "holds no runs (is storage.data_dir right?)"
LLM_SERVER = "the embedded vLLM server lives in embedded_llm.cache_dir, not the data folder; no id"
NO_DATA_READ = "reads no file of the data folder before it starts"

ROWS: dict[tuple, Row] = {
    ("run",): Row(
        {
            "malformed value": Case(["run", "--run-id", "../x"], "invalid run id '../x'"),
            "data folder is a file": Case(["run"], A_FILE),
            "unreadable file inside": Case(
                ["run", "--run-id", RUN], "corrupt manifest", garbage(f"runs/{RUN}/manifest.json")
            ),
        },
        {
            "unknown id": "`run --run-id NEW` starts that run: a legitimate create",
            "missing data folder": "a first run creates the data folder",
            "empty data folder": "a first run fills an empty data folder",
        },
    ),
    ("import",): Row(
        {
            "malformed value": Case(["import", "in.jsonl", "--import-id", "../x"], "invalid run id '../x'"),
            "data folder is a file": Case(["import", "in.jsonl"], A_FILE),
            "unreadable file inside": Case(
                ["import", "in.jsonl", "--import-id", RUN], "corrupt manifest", garbage(f"runs/{RUN}/manifest.json")
            ),
        },
        {
            "unknown id": "`import --import-id NEW` starts that import: a legitimate create",
            "missing data folder": "a first import creates the data folder",
            "empty data folder": "a first import fills an empty data folder",
        },
    ),
    ("plan",): Row(
        {
            "data folder is a file": Case(["plan"], A_FILE),
            "unreadable file inside": Case(["plan"], "catalog", garbage("catalog.duckdb")),
        },
        {
            "unknown id": NO_ID,
            "malformed value": NO_ID,
            "missing data folder": "no earlier runs: plan sends a pilot instead (its first use)",
            "empty data folder": "no earlier runs: plan sends a pilot instead (its first use)",
        },
    ),
    ("clean",): Row(
        {
            "unknown id": Case(["clean", "--run", "no-such-run"], "no generation run 'no-such-run' under"),
            "malformed value": Case(["clean", "--clean-id", "../x"], "invalid clean id '../x'"),
            "missing data folder": Case(["clean"], NO_RUNS),
            "empty data folder": Case(["clean"], NO_RUNS),
            "data folder is a file": Case(["clean"], A_FILE),
            "unreadable file inside": Case(
                ["clean"], "unreadable Parquet", garbage(f"runs/{RUN}/examples/g00-00000.parquet")
            ),
        }
    ),
    ("query",): Row(
        {
            "malformed value": Case(["query", "SELECT 1", "--out", "rows.txt"], "--out must end in .csv or .parquet"),
            "missing data folder": Case(["query", "SELECT 1"], NO_RUNS),
            "empty data folder": Case(["query", "SELECT 1"], NO_RUNS),
            "data folder is a file": Case(["query", "SELECT 1"], A_FILE),
            "unreadable file inside": Case(["query", "SELECT count(*) FROM raw"], "catalog", garbage("catalog.duckdb")),
        },
        {"unknown id": "takes SQL, no id (an unknown view is DuckDB's one-line error: tests/app/test_catalog.py)"},
    ),
    ("report",): Row(
        {
            "unknown id": Case(["report", "--clean-id", "nope"], "no clean run 'nope' under"),
            "malformed value": Case(["report", "--clean-id", "../x"], "invalid clean id '../x'"),
            "missing data folder": Case(["report"], NO_RUNS),
            "empty data folder": Case(["report"], NO_RUNS),
            "data folder is a file": Case(["report"], A_FILE),
            "unreadable file inside": Case(["report", "--clean-id", CLEAN], "catalog", garbage("catalog.duckdb")),
        }
    ),
    ("finetune",): Row(
        {
            "unknown id": Case(["finetune", "--clean-id", "nope"], "no clean run 'nope' under"),
            "malformed value": Case(["finetune", "--clean-id", "../x"], "invalid clean id '../x'"),
            "missing data folder": Case(["finetune"], NO_RUNS),
            "empty data folder": Case(["finetune"], NO_RUNS),
            "data folder is a file": Case(["finetune"], A_FILE),
            "unreadable file inside": Case(
                ["finetune", "--clean-id", CLEAN],
                "unreadable Parquet",
                folder_instead(f"clean/{CLEAN}/export/train.parquet"),
            ),
        }
    ),
    ("ablate",): Row(
        {
            "unknown id": Case(["ablate", "--clean-id", "nope"], "no clean run 'nope' under"),
            "malformed value": Case(["ablate", "--clean-id", "../x"], "invalid clean id '../x'"),
            "missing data folder": Case(["ablate", "--clean-id", CLEAN], NO_RUNS),
            "empty data folder": Case(["ablate", "--clean-id", CLEAN], NO_RUNS),
            "data folder is a file": Case(["ablate", "--clean-id", CLEAN], A_FILE),
            "unreadable file inside": Case(
                ["ablate", "--clean-id", CLEAN], "unreadable Parquet", garbage(f"clean/{CLEAN}/export/train.parquet")
            ),
        }
    ),
    ("serve",): Row(
        {
            "unknown id": Case(["serve", "--base-model", "./no-such-model"], "no such folder"),
            "data folder is a file": Case(["serve"], A_FILE),
        },
        {
            "malformed value": "its only names are a model folder (unknown id) and a work pool (made if missing)",
            "missing data folder": "serving before any clean run is its normal start: it waits for clean runs",
            "empty data folder": "serving before any clean run is its normal start: it waits for clean runs",
            "unreadable file inside": NO_DATA_READ,
        },
    ),
    ("deploy",): Row(
        {"data folder is a file": Case(["deploy", "--no-worker"], A_FILE)},
        {
            "unknown id": NO_ID,
            "malformed value": NO_ID,
            "missing data folder": "deploying comes before any run",
            "empty data folder": "deploying comes before any run",
            "unreadable file inside": NO_DATA_READ,
        },
    ),
    ("trigger",): Row(
        {
            # the closest name first
            "unknown id": Case(
                ["trigger", "pipline"], "no deployment 'pipline' in prefect.yaml (deployments: pipeline,"
            ),
            "malformed value": Case(["trigger", "a/b/c"], "invalid deployment name 'a/b/c'"),
            "data folder is a file": Case(["trigger", "pipeline"], A_FILE),
        },
        {
            "missing data folder": "a worker runs the flow; triggering `generate` first is legitimate",
            "empty data folder": "a worker runs the flow; triggering `generate` first is legitimate",
            "unreadable file inside": NO_DATA_READ,
        },
    ),
    ("doctor",): Row(
        {},
        {case: "doctor reports a bad data folder as a FAIL row (its purpose); it takes no id" for case in CASES},
    ),
    **{("llm", verb): Row({}, dict.fromkeys(CASES, LLM_SERVER)) for verb in ("up", "down", "status")},
    **{
        ("prefect", verb): Row(
            {"data folder is a file": Case(["prefect", verb], A_FILE)},
            {
                "unknown id": NO_ID,
                "malformed value": NO_ID,
                "missing data folder": "its home <data_dir>/prefect is made by `up`; down/status read nothing",
                "empty data folder": "its home <data_dir>/prefect is made by `up`; down/status read nothing",
                "unreadable file inside": NO_DATA_READ,
            },
        )
        for verb in ("up", "down", "status")
    },
}


def test_every_command_has_a_row():
    """A command `--help` lists without a row here fails; each row covers every case or says why not."""
    commands = cli_commands()
    assert {"run", "clean", "report"} <= {c[0] for c in commands} and ("llm", "up") in commands
    missing = [" ".join(c) for c in commands if c not in ROWS]
    assert not missing, f"commands without a row in ROWS: {missing}; add one"
    assert not set(ROWS) - set(commands), "rows of commands that no longer exist"
    for command, row in ROWS.items():
        assert set(row.cases) | set(row.not_applicable) == set(CASES), command
        assert not set(row.cases) & set(row.not_applicable), command
    # README.md (Failure modes, "bad input") quotes these counts
    assert (len(commands), sum(bool(row.cases) for row in ROWS.values()), len(PARAMS)) == (18, 14, 46)


# --- the data folders --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """A data folder with one generation run and one clean run with an export (copied for every test)."""
    data = tmp_path_factory.mktemp("reference") / "data"
    make_generation_run(data, RUN, 8)
    make_export(data, CLEAN, 20)
    return data


def tree(root: Path) -> dict[str, str]:
    """Every file and folder under ``root``: folders by name, files by content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        for name in dirnames:
            out[(base / name).relative_to(root).as_posix() + "/"] = "dir"
        for name in filenames:
            out[(base / name).relative_to(root).as_posix()] = hashlib.sha256((base / name).read_bytes()).hexdigest()
    return out


@pytest.fixture
def no_servers(monkeypatch):
    """Starting either server is a failure of the command under test; no outside settings leak in."""
    from embed_factory.llm_server import EmbeddedLLMServer
    from embed_factory.prefect_server import LocalPrefectServer

    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__}.start() called before the input was checked")

    monkeypatch.setattr(EmbeddedLLMServer, "start", refuse)
    monkeypatch.setattr(LocalPrefectServer, "start", refuse)
    for name in list(os.environ):
        if name.startswith(("EMBED_FACTORY_", "PREFECT_API_URL")):
            monkeypatch.delenv(name)


def data_folder(case: str, tmp_path: Path, reference: Path, damage) -> Path:
    data = tmp_path / "data"
    if case == "missing data folder":
        return data
    if case == "empty data folder":
        data.mkdir()
    elif case == "data folder is a file":
        data.write_text("not a folder\n")
    else:
        shutil.copytree(reference, data)
        if damage is not None:
            damage(data)
    return data


PARAMS = [
    pytest.param(command, case, id=f"{' '.join(command)}: {case}")
    for command, row in ROWS.items()
    for case in row.cases
]


@pytest.mark.parametrize("command, case", PARAMS)
def test_bad_input_is_one_line_and_changes_nothing(command, case, reference, tmp_path, monkeypatch, no_servers):
    row = ROWS[command].cases[case]
    data = data_folder(case, tmp_path, reference, row.damage)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # no embed-factory.toml, and nothing may be written here either
    before = tree(tmp_path)
    result = CliRunner().invoke(app, row.args, env={"EMBED_FACTORY_STORAGE__DATA_DIR": str(data)})
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert row.needle in lines[0], lines[0]
    if case not in ("missing data folder", "empty data folder", "data folder is a file") and "clean run" in row.needle:
        assert CLEAN in lines[0], "the error names the clean runs that exist"
    if "generation run" in row.needle:
        assert RUN in lines[0], "the error names the runs that exist"
    assert tree(tmp_path) == before, "the command created or changed files"


def test_unknown_ids_on_s3(s3_root, tmp_path, monkeypatch, no_servers):
    """The same lookups on an s3:// data dir (moto): unknown ids name what exists, an empty prefix holds
    no runs, and no object or local file appears."""
    from storage.corpus import CleanStore
    from support.s3_server import keys

    make_generation_run(s3_root, RUN, 4)
    CleanStore(s3_root, CLEAN).write_inputs([RUN])
    empty = s3_root / "empty"
    monkeypatch.chdir(tmp_path)
    env = {"EMBED_FACTORY_STORAGE__ENDPOINT_URL": s3_root.storage_options["endpoint_url"]}
    before = keys(s3_root), tree(tmp_path)
    for args, root, needle in [
        (["clean", "--run", "nope"], s3_root, f"no generation run 'nope' under {s3_root}/runs (runs: {RUN})"),
        (["report", "--clean-id", "nope"], s3_root, f"no clean run 'nope' under {s3_root}/clean (clean runs: {CLEAN})"),
        (["query", "SELECT 1"], empty, f"{empty} holds no runs"),
    ]:
        result = CliRunner().invoke(app, args, env={**env, "EMBED_FACTORY_STORAGE__DATA_DIR": str(root)})
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error:"), result.output
        assert needle in lines[0], lines[0]
    assert (keys(s3_root), tree(tmp_path)) == before
