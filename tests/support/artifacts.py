"""Read a flow run's Prefect artifacts back through the client API, as the artifact tests and the fleet-hang test do."""

from __future__ import annotations

import json


def artifacts_of(flow_run_id) -> dict[str, object]:
    """The artifacts of one flow run by key, read through the Prefect client API."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    by_key = {a.key: a for a in found}
    assert len(by_key) == len(found), "one artifact per key per run"
    return by_key


def table_of(artifact) -> list[dict]:
    assert artifact.type == "table"
    return json.loads(artifact.data)
