"""The CLI turns user mistakes into one clear line and a non-zero exit code, never a traceback."""

from __future__ import annotations

import json

import pytest

from support.cli_process import cli


@pytest.mark.parametrize("command", [[], ["run"], ["llm"], ["llm", "up"], ["prefect"]])
def test_help_everywhere(command):
    result = cli(*command, "--help")
    assert result.returncode == 0
    assert "Usage" in result.stdout


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "no personas"),
        (b'{"persona": "ok person here"}\n{"persona": \n', ":2: not valid JSON"),
        (b'{"name": "x"}\n', ':1: expected {"persona"'),
        (b"\xff\xfe\x00\x01binary", "not UTF-8"),
    ],
)
def test_bad_persona_file_is_one_clear_error(tmp_path, content, expected):
    bad = tmp_path / "personas.jsonl"
    bad.write_bytes(content)
    result = cli(
        "run",
        "-n",
        "1",
        env={"EMBED_FACTORY_PERSONAS__SOURCE": str(bad), "EMBED_FACTORY_STORAGE__DATA_DIR": str(tmp_path / "data")},
    )
    assert result.returncode == 1
    assert expected in result.stderr and str(bad) in result.stderr.replace("\n", "")
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "data").exists(), "nothing written for a rejected run"


def test_invalid_setting_names_the_key(tmp_path):
    result = cli("run", env={"EMBED_FACTORY_GENERATION__SHARD_SIZE": "0"})
    assert result.returncode == 1
    assert "generation.shard_size" in result.stderr and "Traceback" not in result.stderr


def test_unknown_task_type(tmp_path):
    result = cli("run", "-t", "poetry", env={"EMBED_FACTORY_STORAGE__DATA_DIR": str(tmp_path)})
    assert result.returncode == 2 and "unknown task type" in result.stderr


def test_missing_config_file_is_reported(tmp_path):
    result = cli("run", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode != 0 and "Traceback" not in result.stderr


# --- the package's pieces, in process -----------------------------------------------------------------------
COMMANDS = [
    ["run"],
    ["clean"],
    ["import"],
    ["query"],
    ["report"],
    ["finetune"],
    ["serve"],
    ["doctor"],
    ["deploy"],
    ["trigger"],
    ["llm", "up"],
    ["llm", "down"],
    ["llm", "status"],
    ["prefect", "up"],
    ["prefect", "down"],
    ["prefect", "status"],
]


def test_every_command_is_registered_with_its_help():
    from typer.testing import CliRunner

    from embed_factory.cli import app

    runner = CliRunner()
    top = runner.invoke(app, ["--help"])
    listed = {line.split()[1] for line in top.output.splitlines() if line.startswith("│ ") and len(line.split()) > 2}
    assert {c[0] for c in COMMANDS} <= listed, top.output
    for command in COMMANDS:
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0 and "Usage" in result.output, (command, result.output)


def test_command_frame_turns_errors_and_ctrl_c_into_one_line(capsys):
    import typer

    from embed_factory.cli.frame import command_frame
    from personas.sources import PersonaFileError

    with pytest.raises(typer.Exit) as failed, command_frame():
        raise PersonaFileError("personas.jsonl:2: not valid JSON")
    assert failed.value.exit_code == 1
    assert capsys.readouterr().err.strip() == "error: personas.jsonl:2: not valid JSON"

    with pytest.raises(typer.Exit) as interrupted, command_frame(interrupted="interrupted; resume it"):
        raise KeyboardInterrupt
    assert interrupted.value.exit_code == 130 and "error: interrupted; resume it" in capsys.readouterr().err

    with command_frame(stopped="worker stopped"):  # a serving command: Ctrl-C is the way to stop it
        raise KeyboardInterrupt
    said = capsys.readouterr().err
    assert "worker stopped" in said and "error" not in said

    with pytest.raises(KeyboardInterrupt), command_frame():  # nothing said: Python's own handling
        raise KeyboardInterrupt
    with pytest.raises(ZeroDivisionError), command_frame():  # a bug is not a user error: its traceback stays
        raise ZeroDivisionError


def test_summaries_are_printed_from_their_dataclasses(capsys):
    from embed_factory.cli.data import print_clean_summary
    from embed_factory.cli.run import print_generate_summary
    from flows.clean import CleanSummary
    from flows.generate import GenerateSummary

    summary = GenerateSummary(
        run_id="r1",
        run_dir="/data/runs/r1",
        examples_by_type={"retrieval": 7, "sts": 5},
        rejects=3,
        requests=15,
        failure_rate=0.2,
        completion_tokens=900,
        tokens_per_s=45.0,
        elapsed_s=20.0,
        unique_instructions={"retrieval": 4},
        personas=8,
        shards_written=2,
        shards_skipped=1,
        warnings=["few personas"],
        llm_calls=17,
        http_attempts=19,
    )
    print_generate_summary(summary, "http://127.0.0.1:4200/api")
    out = capsys.readouterr().out
    assert "12" in out.split("total", 1)[1].splitlines()[0]  # 7 + 5
    assert "requests: 15  rejects: 3 (failure rate 20.0%)" in out and "shards written/skipped: 2/1" in out
    assert "LLM: 17 calls, 19 HTTP attempts" in out and "warning: few personas" in out
    assert "UI:     http://127.0.0.1:4200/runs" in out and "/data/runs/r1/examples/*.parquet" in out

    clean = CleanSummary(
        clean_id="c1",
        runs=["r1", "r2"],
        counts={"valid": 10, "mined": 6},
        dropped={"exact_dup": 4},
        export_dir="/data/clean/c1/export",
        report="/data/report.html",
    )
    print_clean_summary(clean)
    out = capsys.readouterr().out
    assert "clean c1 (2 run(s))" in out and "dropped: exact_dup 4" in out
    assert "export: /data/clean/c1/export   report: /data/report.html" in out


def test_finetune_summary_is_printed_from_its_json_form(capsys):
    from embed_factory.cli.train import print_finetune_summary
    from flows.finetune import FinetuneSummary

    def sts(spearman: dict[str, float]) -> dict:
        sts = {"split": "test", "languages": ["en"], "pairs": {"en": 20}, "spearman": {"mean": spearman}}
        return {"model": "mini", "precision": "fp32", "sts": sts, "dims": [384, 64]}

    summary = dict(
        clean_id="c1",
        base_model="mini",
        train_path="/d/train.parquet",
        heldout_path=None,
        model_dir="/d/models/mini-c1",
        eval_path="/d/models/mini-c1/eval.json",
        train={
            "steps": 5,
            "samples": 40,
            "samples_per_s": 8.0,
            "train_seconds": 5.0,
            "first_loss": 1.25,
            "last_loss": 0.5,
            "loss_start": 1.1,  # per-step ends: not printed, their batches differ (no trend)
            "loss_end": 0.6,
            "loss_window": 2,
            # the comparable loss: the same held-out batches before and after, as the flow's summary carries it
            "heldout_loss_before": {
                "mean": 2.5,
                "by_task": {"sts": 2.0, "retrieval": 3.0},
                "batches": 4,
                "rows": 16,
                "source": "heldout",
            },
            "heldout_loss_after": {
                "mean": 1.25,
                "by_task": {"sts": 1.0, "retrieval": 1.5},
                "batches": 4,
                "rows": 16,
                "source": "heldout",
            },
        },
        key_deltas={},
        before=sts({"384": 0.8, "64": 0.7}),
        after=sts({"384": 0.85, "64": 0.65}),
        delta={"sts": {"mean": {"384": 0.05, "64": -0.05}}},
    )
    # as a deployment's flow run or finetune.json gives it back: plain JSON, validated into the summary
    print_finetune_summary(FinetuneSummary.of(json.loads(json.dumps(summary))))
    out = capsys.readouterr().out
    assert "mini fine-tuned on c1: STS Spearman (en)" in out.replace("\n", " ").replace("  ", " ")
    rows = {
        line.split()[1]: line.split()[3:8:2]
        for line in out.splitlines()
        if line.startswith("│ ") and line.split()[1] in ("384", "64")
    }
    assert rows == {"384": ["0.8000", "0.8500", "+0.0500"], "64": ["0.7000", "0.6500", "-0.0500"]}, out
    flat = " ".join(out.split())
    assert (
        "training: 5 steps, 40 samples, 8.0 samples/s, 5s; held-out loss 2.5000 -> 1.2500 (4 fixed batches of "
        "heldout rows; by type: sts 2.0000 -> 1.0000, retrieval 3.0000 -> 1.5000)"
    ) in flat
    assert "1.1000" not in flat  # the per-step ends are no trend: not in the summary
    assert "model: /d/models/mini-c1" in out and "eval:  /d/models/mini-c1/eval.json" in out


def test_prefect_ui_url():
    from embed_factory.prefect_server import prefect_ui_url

    assert prefect_ui_url("http://prefect-server:4200/api") == "http://prefect-server:4200"
    assert prefect_ui_url("http://127.0.0.1:4200") == "http://127.0.0.1:4200"


@pytest.mark.parametrize("fails", [None, "prefect", "vllm"])
def test_run_starts_prefect_while_vllm_sets_up_and_raises_either_failure(monkeypatch, fails):
    """The local Prefect server's start (~20 s on a first run) overlaps vLLM's set-up instead of following it:
    the fake vLLM start returns only once Prefect's start has begun in another thread."""
    import threading

    import embed_factory.cli.run as run
    from ground.settings import load_settings

    prefect_began = threading.Event()

    def fake_resolve(settings, say):
        prefect_began.set()
        if fails == "prefect":
            raise RuntimeError("prefect failed")
        return "http://prefect/api"

    class FakeServer:
        def __init__(self, settings, say):
            pass

        def start(self):
            assert prefect_began.wait(10), "Prefect's start did not begin while vLLM was starting"
            if fails == "vllm":
                raise RuntimeError("vllm failed")

    monkeypatch.setattr(run, "resolve_api_url", fake_resolve)
    monkeypatch.setattr(run, "EmbeddedLLMServer", FakeServer)
    settings = load_settings()
    assert settings.uses_embedded_llm
    if fails:
        with pytest.raises(RuntimeError, match=f"{fails} failed"):
            run.start_servers(settings)
    else:
        assert run.start_servers(settings) == "http://prefect/api"


@pytest.mark.parametrize(
    "error",
    [
        "personas.sources.PersonaFileError",
        "prompts.render.OutputInvalid",
        "storage.shards.RunLocked",
        "storage.catalog.CatalogError",
    ],
)
def test_a_user_error_raised_in_a_command_is_one_error_line(error, capsys):
    """What the error classes' bases are for: the command frame turns each into one line and exit code 1."""
    import importlib

    import typer

    from embed_factory.cli.frame import command_frame

    module, name = error.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(typer.Exit) as exc:
        with command_frame():
            raise cls("the thing at /data/x is wrong")
    assert exc.value.exit_code == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["error: the thing at /data/x is wrong"]
