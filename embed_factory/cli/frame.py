"""What every command shares: the console, settings loading, one-line errors, and pointing Prefect at its API.

A command that does real work runs its body in :func:`command_frame` (a user error is one ``error:``
line and a non-zero exit code, never a traceback) and its flows in :func:`prefect_at` (the Prefect API
checked and set, the stages' progress shown as bars).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import get_origin

import httpx
import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from embed_factory.deployments import DeployError
from embed_factory.llm_server import LLMServerError
from embed_factory.prefect_server import PrefectServerError
from ground import progress as progress_sink
from ground.settings import DEFAULT_CONFIG_FILE, Settings, load_settings
from personas.sources import PersonaFileError
from prompts.task_types import check_placeholder_overrides
from storage.catalog import CatalogError
from storage.inventory import check_folder, require_data
from storage.location import StorePath, data_root
from storage.shards import StorageError

console = Console(stderr=True, soft_wrap=True)  # one error = one line, also in logs

#: errors a user can fix (a bad file, a setting, a server that does not answer): one line, no traceback
USER_ERRORS = (
    PersonaFileError,
    LLMServerError,
    PrefectServerError,
    StorageError,
    CatalogError,
    DeployError,
    ValueError,
    FileNotFoundError,
)

ConfigOption = typer.Option(
    None, "--config", "-c", help="TOML config file (default: ./embed-factory.toml).", exists=True, dir_okay=False
)
ProfileOption = typer.Option(None, "--profile", help="Settings profile: local (default) or production.")


def fail(message: str, code: int = 1) -> None:
    console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(code)


def say(message: str) -> None:
    console.print(f"[dim]•[/] {message}")


@contextlib.contextmanager
def command_frame(*, interrupted: str | None = None, stopped: str | None = None) -> Iterator[None]:
    """Run a command's body: a user error becomes one ``error:`` line and exit code 1.

    Ctrl-C: with ``interrupted``, that error line and exit code 130; with ``stopped`` (a command that
    serves until stopped), that note and exit code 0; with neither, Python's KeyboardInterrupt.
    """
    try:
        yield
    except USER_ERRORS as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        if stopped is not None:
            say(stopped)
        elif interrupted is not None:
            fail(interrupted, 130)
        else:
            raise


# --- settings ------------------------------------------------------------------------------------------
def load_cli_settings(config: Path | None, profile: str | None = None) -> Settings:
    """The settings of ``--config`` / ``--profile`` (else the environment's); a bad one is one error line."""
    if config is not None:
        os.environ["EMBED_FACTORY_CONFIG"] = str(config)
    if profile is not None:
        os.environ["EMBED_FACTORY_PROFILE"] = profile
    config_file = Path(os.environ.get("EMBED_FACTORY_CONFIG", DEFAULT_CONFIG_FILE))
    if "EMBED_FACTORY_CONFIG" in os.environ and not config_file.is_file():
        fail(f"config file {config_file} not found (EMBED_FACTORY_CONFIG)")
    try:
        settings = load_settings()
        check_placeholder_overrides(settings.generation.placeholder_overrides)
        return settings
    except ValidationError as exc:
        errors = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}{_setting_source(e['loc'], config_file)}" for e in exc.errors()
        )
        fail(f"invalid settings: {errors}")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        fail(f"invalid settings: {config_file}: not a readable TOML file ({exc})")
    except SettingsError as exc:  # an EMBED_FACTORY_* variable that should hold JSON (a list) does not
        section = exc.args[0].split('"')[1] if '"' in exc.args[0] else ""
        fail(
            f"invalid settings: cannot parse {', '.join(_unparsable_env(section)) or 'an EMBED_FACTORY_* variable'} "
            f'(lists are JSON, e.g. \'["retrieval", "sts"]\'): {exc.__cause__ or exc}'
        )
    except ValueError as exc:  # e.g. an unknown profile
        fail(f"invalid settings: {exc}{_setting_source(('profile',), config_file)}")


def _unparsable_env(section: str) -> list[str]:
    """The EMBED_FACTORY_<SECTION>__* variables of list/dict settings whose value is not JSON."""
    field = Settings.model_fields.get(section)
    keys = getattr(field.annotation, "model_fields", {}) if field else {}
    prefix, names = f"EMBED_FACTORY_{section.upper()}__", []
    for name, value in os.environ.items():
        key = keys.get(name[len(prefix) :].lower()) if name.upper().startswith(prefix) else None
        if key is not None and get_origin(key.annotation) in (list, dict):
            try:
                json.loads(value)
            except ValueError:
                names.append(name)
    return sorted(names)


def _setting_source(loc: tuple, config_file: Path) -> str:
    """Where a bad setting came from: its environment variable, else the config file (if any)."""
    names = {k.upper() for k in os.environ}
    for end in range(len(loc), 0, -1):  # generation.task_types.0 comes from EMBED_FACTORY_GENERATION__TASK_TYPES
        env = "EMBED_FACTORY_" + "__".join(map(str, loc[:end])).upper()
        if env in names:
            return f" (from {env})"
    return f" (in {config_file})" if config_file.is_file() else ""


def checked_data_dir(settings: Settings, *, holds_runs: bool = False) -> StorePath:
    """The data dir, checked before a command starts anything: a file where it (or the local folder of an
    S3 data dir) should be is an error; with ``holds_runs`` (a command that reads runs), so is a folder
    that is missing or holds no runs. Call it inside :func:`command_frame`."""
    storage = settings.storage
    if storage.is_remote:
        check_folder(storage.local_root, "storage.local_dir")
    root = data_root(storage)
    return require_data(root) if holds_runs else check_folder(root)


def checked_export(settings: Settings, clean_id: str | None) -> str:
    """The clean run whose export a training command reads (default: the latest with one), checked before
    any server starts: the data dir, the clean id, and that the training file is Parquet."""
    from storage.inventory import check_parquet, require_clean
    from storage.models import ModelStore, resolve_export

    root = checked_data_dir(settings, holds_runs=True)
    if clean_id is not None:
        require_clean(root, clean_id)
    export = resolve_export(ModelStore.from_settings(settings).data_dir, clean_id)  # S3: mirrored here first
    check_parquet(export.train_path)
    return export.clean_id


# --- Prefect and progress ------------------------------------------------------------------------------
def stage_bars(failed: bool = False) -> Progress:
    """One bar per stage of the progress sink (with ``failed``: a column counting failed items)."""
    columns = [TextColumn("[bold]{task.description:<10}"), BarColumn(), MofNCompleteColumn()]
    if failed:
        columns.append(TextColumn("[red]{task.fields[failed]} failed"))
    return Progress(*columns, TimeElapsedColumn(), console=console)


class _RichProgress:
    """Shows the progress sink's stages as bars."""

    def __init__(self, bar: Progress):
        self.bar = bar
        self.tasks: dict[str, int] = {}
        self.failed: dict[str, int] = {}

    def _task(self, stage: str) -> int:
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=0, failed=0)
            self.failed[stage] = 0
        return self.tasks[stage]

    def add_total(self, stage: str, n: int) -> None:
        task = self._task(stage)
        self.bar.update(task, total=(self.bar.tasks[task].total or 0) + n)

    def advance(self, stage: str, n: int = 1, ok: bool = True) -> None:
        task = self._task(stage)
        if not ok:
            self.failed[stage] += n
        self.bar.update(task, advance=n, failed=self.failed[stage])


@contextlib.contextmanager
def prefect_at(api_url: str, bar: Progress | None = None) -> Iterator[None]:
    """Point Prefect at ``api_url`` and, with ``bar``, show the stages' progress while the block runs."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    try:  # a configured API that does not answer is one clear line, not Prefect's traceback
        httpx.get(f"{api_url.rstrip('/')}/health", timeout=10).raise_for_status()
    except httpx.HTTPError as exc:
        raise PrefectServerError(
            f"Prefect API {api_url} unreachable ({type(exc).__name__}); start it or fix "
            "prefect.api_url / PREFECT_API_URL"
        ) from None
    remove = progress_sink.add_listener(_RichProgress(bar)) if bar is not None else (lambda: None)
    consoles = [h for h in logging.getLogger().handlers if type(h).__name__ == "PrefectConsoleHandler"]
    for handler in consoles:
        handler.addFilter(_no_user_error_tracebacks)
    try:
        shown = bar if bar is not None else contextlib.nullcontext()
        with temporary_settings(updates={PREFECT_API_URL: api_url}), shown:
            yield
    finally:
        remove()
        for handler in consoles:
            handler.removeFilter(_no_user_error_tracebacks)


def _no_user_error_tracebacks(record: logging.LogRecord) -> bool:
    """Prefect logs a failed task's or flow's exception with its traceback; for a user error (a bad file,
    a locked run, a full disk) the CLI prints one line instead, so the console drops those records.
    The Prefect API (UI) still gets them."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, USER_ERRORS)
