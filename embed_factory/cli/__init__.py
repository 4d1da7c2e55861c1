"""The ``embed-factory`` command line: run the pipeline, manage the embedded servers.

The commands live by job: :mod:`.run` (generate, then clean), :mod:`.plan` (the cost preview),
:mod:`.data` (clean, query, report),
:mod:`.importing` (import),
:mod:`.train` (finetune, serve), :mod:`.ablate` (ablate), :mod:`.ops` (doctor, deploy, trigger) and
:mod:`.servers` (the ``llm`` and ``prefect`` groups); :mod:`.frame` holds what they share. Heavy imports
(the flows, Prefect's client, torch) happen inside the commands, so ``--help`` and the server commands
start fast.
"""

from __future__ import annotations

import typer

from embed_factory.cli import ablate, data, importing, ops, plan, run, servers, train

app = typer.Typer(
    help="Embedding-training data factory: personas → LLM → Parquet shards.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
for command in (
    run.run,
    plan.plan,
    data.clean,
    data.query,
    data.report,
    train.finetune,
    train.serve,
    ablate.ablate,
    ops.doctor,
    ops.deploy,
    ops.trigger,
):
    app.command()(command)
app.command(name="import")(importing.import_data)  # `import` is a Python keyword: the function is import_data
app.add_typer(servers.llm_app, name="llm")
app.add_typer(servers.prefect_app, name="prefect")


def main() -> None:  # pragma: no cover
    app(prog_name="embed-factory")
