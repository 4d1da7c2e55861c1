"""Ad-hoc deployment runs (``embed-factory trigger``): ``--param`` values typed and checked against the
deployment's parameter schema, then one run started and, if asked, followed to its final state."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from embed_factory.deployments import DeployError


def parse_param_pairs(pairs: list[str]) -> dict[str, str]:
    """``["k=v", …]`` → ``{"k": "v"}`` (raw text; :func:`coerce_parameters` types it)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise DeployError(f"--param {pair!r}: expected NAME=VALUE, e.g. --param examples=12")
        if key in out:
            raise DeployError(f"--param {key} given twice")
        out[key] = value
    return out


def _json_types(prop: dict[str, Any], definitions: dict[str, Any]) -> set[str]:
    """The JSON types a parameter's schema allows (through anyOf/allOf/$ref)."""
    if "$ref" in prop:
        return _json_types(definitions.get(prop["$ref"].rsplit("/", 1)[-1], {}), definitions)
    types = set()
    if "type" in prop:
        types |= set(prop["type"] if isinstance(prop["type"], list) else [prop["type"]])
    if "enum" in prop and "type" not in prop:
        types |= {_JSON_TYPE.get(type(v), "string") for v in prop["enum"]}
    for key in ("anyOf", "oneOf", "allOf"):
        for sub in prop.get(key, []):
            types |= _json_types(sub, definitions)
    return types


_JSON_TYPE = {
    bool: "boolean",
    int: "integer",
    float: "number",
    str: "string",
    list: "array",
    dict: "object",
    type(None): "null",
}


def coerce_parameters(
    raw: dict[str, str], schema: dict[str, Any], deployment: str, defaults: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Type ``--param`` values by the deployment's parameter schema and validate them; one-line errors.

    A value is JSON when it parses as JSON (``6``, ``true``, ``null``, ``["a","b"]``), else text; for an
    array parameter, text is split on commas (``task_types=retrieval,sts``); for a text parameter,
    ``run_id=123`` stays the text ``"123"``. ``defaults``: the deployment's own parameters (they count
    for required parameters).
    """
    from prefect.exceptions import ParameterTypeError
    from prefect.utilities.schema_tools import ValidationError, validate

    props = schema.get("properties") or {}
    definitions = schema.get("definitions") or schema.get("$defs") or {}
    out: dict[str, Any] = {}
    for key, text in raw.items():
        if key not in props:
            raise DeployError(f"{deployment} has no parameter {key!r}; parameters: {', '.join(props) or 'none'}")
        types = _json_types(props[key], definitions)
        try:
            value = json.loads(text)
        except ValueError:
            value = text
        kind = _JSON_TYPE.get(type(value), "string")
        if isinstance(value, str) and "array" in types and "string" not in types:
            value = [item.strip() for item in value.split(",") if item.strip()]
        elif kind not in types and not (kind == "integer" and "number" in types) and "string" in types:
            value = text
        out[key] = value
    try:
        validate({**(defaults or {}), **out}, schema, raise_on_error=True, ignore_required=True)
    except (ValidationError, ParameterTypeError) as exc:
        raise DeployError(f"{deployment}: {_validation_message(str(exc), out, props, definitions)}") from None
    missing = [k for k in schema.get("required") or [] if k not in {**(defaults or {}), **out}]
    if missing:
        raise DeployError(f"{deployment}: parameter {missing[0]} is required: add --param {missing[0]}=VALUE")
    return out


def _validation_message(text: str, values: dict[str, Any], props: dict[str, Any], definitions: dict[str, Any]) -> str:
    """Prefect's "Validation failed for field 'x'. Failure reason: …" as one short line about the parameter."""
    found = re.match(r"Validation failed(?: for field '([^']+)')?\. Failure reason: (.*)", text, re.S)
    if not found:
        return text.splitlines()[0]
    where, reason = found.group(1), found.group(2).strip()
    if where is None:
        return reason
    key = re.split(r"[.\[]", where, maxsplit=1)[0]
    if "is not valid under any of the given schemas" in reason and key in props:
        expected = " or ".join(sorted(_json_types(props[key], definitions))) or "valid"
        reason = f"{values.get(key)!r} is not {expected}"
    return f"parameter {where}: {reason}"


def resolve_deployment(name: str):
    """The deployment called ``name``: ``flow/deployment``, or a deployment name that is unique."""
    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        if "/" in name:
            try:
                return client.read_deployment_by_name(name)
            except ObjectNotFound:
                pass
            found = []
        else:
            found = client.read_deployments(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[name])))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            names = ", ".join(sorted(f"{_flow_name(client, d.flow_id)}/{d.name}" for d in found))
            raise DeployError(f"{name!r} names several deployments ({names}); give FLOW/DEPLOYMENT")
        known = sorted(f"{_flow_name(client, d.flow_id)}/{d.name}" for d in client.read_deployments())
        hint = f"deployments: {', '.join(known)}" if known else "no deployments yet; run `embed-factory deploy` first"
        raise DeployError(f"no deployment {name!r}; {hint}")


def _flow_name(client, flow_id) -> str:
    return client.read_flow(flow_id).name


def trigger(
    name: str,
    param_pairs: list[str],
    wait: bool = True,
    poll_s: float = 2.0,
    say: Callable[[str], None] = lambda _: None,
    worker_hint_s: float = 15.0,
):
    """Start a run of deployment ``name`` with ``--param`` pairs; with ``wait``, return it once final.

    Returns ``(flow_run, full_name)``. While it waits, each state change is reported through
    ``say``; a run still Scheduled after ``worker_hint_s`` with no online worker in its pool gets a hint.
    """
    import time

    from prefect import get_client
    from prefect.deployments import run_deployment

    deployment = resolve_deployment(name)
    with get_client(sync_client=True) as client:
        full_name = f"{_flow_name(client, deployment.flow_id)}/{deployment.name}"
    parameters = coerce_parameters(
        parse_param_pairs(param_pairs), deployment.parameter_openapi_schema or {}, full_name, deployment.parameters
    )
    run = run_deployment(deployment.id, parameters=parameters, timeout=0, as_subflow=False)
    say(f"{full_name}: flow run {run.name!r} ({run.id}) {run.state_name}")
    if not wait:
        return run, full_name
    last, started, hinted = run.state_name, time.monotonic(), False
    with get_client(sync_client=True) as client:
        while not (run.state and run.state.is_final()):
            time.sleep(poll_s)
            run = client.read_flow_run(run.id)
            if run.state_name != last:
                last = run.state_name
                say(f"{run.name}: {last}")
            if (
                not hinted
                and run.state
                and run.state.is_scheduled()
                and deployment.work_pool_name
                and time.monotonic() - started > worker_hint_s
            ):
                hinted = True
                if not _online_workers(client, deployment.work_pool_name):
                    say(
                        f"no worker of work pool {deployment.work_pool_name!r} is online; start one with "
                        f"`embed-factory deploy` or `prefect worker start --pool {deployment.work_pool_name}`"
                    )
    return run, full_name


def _online_workers(client, pool: str) -> list:
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus

    try:
        return client.read_workers_for_work_pool(
            pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"]))
        )
    except Exception:  # the hint is best effort
        return [None]
