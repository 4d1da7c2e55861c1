"""Several writers of one run: per-shard manifest entries and per-shard claims, locally and on S3.

* two processes committing shards of one run at the same moment keep every shard's entry (a shared
  manifest.json rewritten by each commit loses entries here);
* a run made before manifest.d (one manifest.json) is still read, resumed and added to;
* a claim is exclusive while its holder lives; it goes stale when it expires or its process dies, and
  then exactly one of the workers that want it takes it over; a holder whose claim was taken commits nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from storage.claims import ClaimLost, ShardClaims, is_stale
from storage.shards import RunStore
from support.rows import example

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARDS_PER_WRITER = 40

_WRITER = textwrap.dedent(
    """
    import sys, time
    from storage.shards import RunStore
    from support.rows import example
    data, name, n, start_at = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    store = RunStore(data, "shared")
    while time.time() < start_at:
        time.sleep(0.001)
    for i in range(n):
        shard = f"g00-{name}{i:04d}"
        rows = [dict(example("shared", i, f"query {name} {i}", "a positive text"), shard_id=shard)]
        with store.claim("examples", shard) as claim:
            assert claim is not None
            store.write_shard("examples", shard, rows, [])
    """
)


def test_two_writers_committing_at_once_keep_every_entry(tmp_path):
    start_at = time.time() + 3  # both interpreters are up by then; they commit in the same instants
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path), name, str(SHARDS_PER_WRITER), str(start_at)],
            cwd=REPO_ROOT,
            env={"PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests'}", "PATH": "/usr/bin:/bin"},
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("a", "b")
    ]
    for writer in writers:
        _, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err
    store = RunStore(tmp_path, "shared")
    manifest = store.manifest()
    wanted = {f"examples/g00-{n}{i:04d}" for n in "ab" for i in range(SHARDS_PER_WRITER)}
    assert set(manifest) == wanted
    assert store.read_kind("examples").num_rows == 2 * SHARDS_PER_WRITER
    assert not list((store.root / "claims" / "examples").glob("*.json")), "every claim released"


def _rows(shard: str, n: int) -> list[dict]:
    return [dict(example("r", i, f"query {shard} {i}", "a positive text"), shard_id=shard) for i in range(n)]


def test_a_run_with_a_single_file_manifest_is_still_read_and_resumed(tmp_path):
    store = RunStore(tmp_path, "r")
    first = store.write_shard("examples", "g00-00000", _rows("g00-00000", 3), [])
    # as a run written before manifest.d looks: one manifest.json, no entry files
    for path in store.entries.entries_dir.rglob("*.json"):
        path.unlink()
    legacy = {"run_id": "r", "updated_at": "2026-01-01T00:00:00", "shards": {"examples/g00-00000": first.to_json()}}
    store.legacy_manifest_path.write_text(json.dumps(legacy))

    old = RunStore(tmp_path, "r")
    assert old.has_manifest() and old.manifest() == {"examples/g00-00000": first.to_json()}
    assert old.is_complete("examples", "g00-00000")
    assert not old.entries.entry_path("examples/g00-00000").exists(), "a legacy entry needs no recovery"
    old.write_shard("examples", "g00-00001", _rows("g00-00001", 2), [])
    assert set(RunStore(tmp_path, "r").manifest()) == {"examples/g00-00000", "examples/g00-00001"}
    assert json.loads(store.legacy_manifest_path.read_text()) == legacy, "the old file is never rewritten"


def _claims(root, ttl_s: float) -> ShardClaims:
    return ShardClaims(root / "runs" / "r" if isinstance(root, Path) else root / "runs" / "r", ttl_s)


@pytest.fixture(params=["local", "s3"])
def run_root(request, tmp_path):
    if request.param == "local":
        return tmp_path
    return request.getfixturevalue("s3_root")


def test_a_claim_is_exclusive_until_released(run_root):
    claims = _claims(run_root, ttl_s=30)
    held = claims.try_take("examples/g00")
    assert held is not None
    assert claims.try_take("examples/g00") is None, "a live holder's claim is not taken"
    assert claims.try_take("examples/g01") is not None, "other shards are free"
    assert claims.holder("examples/g00")["owner"] == held.owner
    held.check()
    claims.release(held)
    assert claims.holder("examples/g00") is None
    assert claims.try_take("examples/g00") is not None


def test_an_expired_claim_is_taken_by_exactly_one_worker_and_its_holder_commits_nothing(run_root):
    claims = _claims(run_root, ttl_s=0.5)
    stalled = claims.try_take("examples/g00")  # never renewed: a worker stalled (or on a host that died)
    assert stalled is not None and claims.try_take("examples/g00") is None
    time.sleep(0.7)
    assert is_stale(claims.holder("examples/g00"))
    with ThreadPoolExecutor(8) as pool:  # eight workers want it at the same moment
        taken = [c for c in pool.map(lambda _: claims.try_take("examples/g00"), range(8)) if c is not None]
    assert len(taken) == 1
    assert claims.holder("examples/g00")["owner"] == taken[0].owner
    with pytest.raises(ClaimLost, match="g00"):
        stalled.check()
    claims.release(stalled)  # a late release does not free the new holder's claim
    assert claims.holder("examples/g00")["owner"] == taken[0].owner


def test_a_renewed_claim_outlives_its_ttl(run_root):
    claims = _claims(run_root, ttl_s=0.6)
    with claims.try_take("examples/g00") as held:  # the heartbeat renews it every ttl / 3
        time.sleep(1.5)
        assert claims.try_take("examples/g00") is None
        held.check()
    assert claims.holder("examples/g00") is None, "released at the end"


def test_a_dead_holders_claim_on_this_host_is_stale_at_once(tmp_path):
    claims = _claims(tmp_path, ttl_s=600)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    path = claims.path("examples/g00")
    path.parent.mkdir(parents=True)
    body = json.loads(claims.body("someone-else"))
    path.write_text(json.dumps({**body, "pid": gone.pid}))
    assert claims.try_take("examples/g00") is not None
    path.write_text(json.dumps({**body, "host": "elsewhere", "pid": gone.pid}))  # another host: only expiry counts
    assert claims.try_take("examples/g00") is None


def test_a_store_commits_a_claimed_shard_only_while_the_claim_is_its_own(tmp_path):
    store = RunStore(tmp_path, "r", lock_ttl_s=0.5)
    with store.claim("examples", "g00") as claim:
        assert claim is not None
        claim._stop.set()  # the heartbeat stalls: the claim expires and another worker takes it over
        time.sleep(0.7)
        other = RunStore(tmp_path, "r", lock_ttl_s=30).claims.try_take("examples/g00")
        assert other is not None
        with pytest.raises(ClaimLost):
            store.write_shard("examples", "g00", _rows("g00", 2), [])
    assert not store.shard_path("examples", "g00").exists() and not store.rejects_path("g00").exists()
    assert store.claims.holder("examples/g00")["owner"] == other.owner
