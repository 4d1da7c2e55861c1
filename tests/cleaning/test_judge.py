"""The LLM judge stage (tasks/cleaning/judge.py) against a real local HTTP server that speaks the OpenAI chat
API and answers from a rule set here (a passage containing RELEVANT is relevant, PARTIAL partially), so every
verdict, request count and outcome is known; plus the spare candidates mining keeps for it, and one round trip
of the judge prompt through the real embedded vLLM server (marker ``llm``)."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pyarrow as pa
import pytest

from ground.settings import load_settings
from llm.client import LLMClient, Sampling
from prompts.judge import JUDGE_PROMPT_VERSION, VERDICTS
from storage.catalog import Catalog
from storage.corpus import CleanStore, StageResult
from storage.stages import VERIFIED_SCHEMA
from support.rows import TOPICS, example, write_run
from tasks.cleaning.judge import Ask, judge_corpus, judge_pair
from tasks.cleaning.negatives import mine_hard_negatives
from tasks.cleaning.report import render_report


def rule(passage: str, keyword: str = "RELEVANT") -> str:
    if keyword in passage:
        return "relevant"
    return "partially_relevant" if "PARTIAL" in passage else "not_relevant"


class RuleLLM:
    """An OpenAI-compatible chat server on 127.0.0.1 whose verdict is ``rule(passage)``; counts what it is asked."""

    def __init__(self, keyword: str = "RELEVANT"):
        self.asked: Counter[str] = Counter()  # passage -> times asked
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                user = body["messages"][-1]["content"]
                passage = user.split("\nPassage: ", 1)[1].split("\n\nDoes the passage", 1)[0]
                owner.asked[passage] += 1
                verdict = rule(passage, keyword)
                content = json.dumps({"reason": f"rule says {verdict}", "verdict": verdict})
                reply = {
                    "id": "c",
                    "object": "chat.completion",
                    "created": 0,
                    "model": body["model"],
                    "choices": [
                        {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}
                    ],
                    "usage": {"prompt_tokens": 10, "completion_tokens": 10, "total_tokens": 20},
                }
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @property
    def requests(self) -> int:
        return sum(self.asked.values())

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def llm():
    server = RuleLLM()
    yield server
    server.close()


def settings_for(llm: RuleLLM, data_dir, prefer: str = "relabel"):
    return load_settings(
        llm={"base_url": llm.base_url, "model": "rule-judge", "max_in_flight": 4, "max_retries": 0},
        clean={"judge": True, "judge_prefer": prefer},
        storage={"data_dir": str(data_dir)},
    )


def mined_row(i, negatives, spares=(), top=None, positive="the positive", task_type="retrieval"):
    return {
        "example_id": f"run/0/{i}",
        "run_id": "run",
        "task_type": task_type,
        "instruction": "Find passages that answer the question.",
        "query": f"question {i}",
        "positive": positive,
        "positive_rank": 1,
        "positive_score": 0.9,
        "hard_negatives": list(negatives),
        "hard_negative_scores": [0.5] * len(negatives),
        "hard_negative_ranks": list(range(51, 51 + len(negatives))),
        "spare_negatives": list(spares),
        "spare_negative_scores": [0.4] * len(spares),
        "spare_negative_ranks": list(range(60, 60 + len(spares))),
        "top_retrieved": top,
        "top_retrieved_rank": 2 if top else None,
        "top_retrieved_score": 0.8 if top else None,
    }


def test_false_negatives_are_replaced_from_the_spares_in_order(llm, tmp_path):
    row = mined_row(0, ["n1 RELEVANT", "n2", "n3 PARTIAL"], spares=["s1 RELEVANT", "s2", "s3"])
    store = CleanStore(tmp_path / "data", "c1")
    result = judge_corpus(pa.Table.from_pylist([row]), settings_for(llm, tmp_path / "data"), store)
    kept = result.kept.to_pylist()[0]
    # n1 judged relevant goes; s1 is judged relevant too, so s2 takes the place; s3 is never asked
    assert kept["hard_negatives"] == ["n2", "n3 PARTIAL", "s2"]
    assert kept["hard_negative_ranks"] == [52, 53, 61]
    assert kept["judge_replaced"] == 2 and kept["judge_relabelled"] is False
    assert llm.asked == Counter({"n1 RELEVANT": 1, "n2": 1, "n3 PARTIAL": 1, "s1 RELEVANT": 1, "s2": 1})
    assert result.dropped.num_rows == 0


@pytest.mark.parametrize("prefer", ["relabel", "drop"])
def test_a_better_retrieved_text_relabels_or_drops_the_sample(llm, tmp_path, prefer):
    rows = [
        mined_row(0, ["n1"], top="top RELEVANT", positive="pos PARTIAL"),  # the judge prefers the retrieved text
        mined_row(1, ["n1"], top="top RELEVANT", positive="pos RELEVANT"),  # a tie: the positive stays
        mined_row(2, ["n1"], top="top other"),  # retrieved not relevant: the positive is not even asked
        mined_row(3, ["a RELEVANT", "b RELEVANT"], spares=["c RELEVANT"]),  # every candidate relevant
    ]
    store = CleanStore(tmp_path / "data", "c1")
    result = judge_corpus(pa.Table.from_pylist(rows), settings_for(llm, tmp_path / "data", prefer), store)
    kept = {r["example_id"]: r for r in result.kept.to_pylist()}
    dropped = {r["example_id"]: r for r in result.dropped.to_pylist()}
    assert dropped["run/0/3"]["reason"] == "judged_no_negatives"
    assert kept["run/0/1"]["positive"] == "pos RELEVANT" and not kept["run/0/1"]["judge_relabelled"]
    assert kept["run/0/2"]["positive"] == "the positive"
    assert llm.asked["the positive"] == 0  # row 2's positive: not needed
    if prefer == "relabel":
        relabelled = kept["run/0/0"]
        assert relabelled["positive"] == "top RELEVANT" and relabelled["judge_relabelled"]
        assert relabelled["positive_rank"] == 2 and relabelled["positive_score"] == pytest.approx(0.8)
        assert set(dropped) == {"run/0/3"}
    else:
        assert "run/0/0" not in kept
        assert dropped["run/0/0"]["reason"] == "judged_false_positive"
        assert "positive judged partially_relevant" in dropped["run/0/0"]["detail"]
    assert {r["stage"] for r in dropped.values()} == {"judge"}


class CrashAfter(CleanStore):
    """A store whose judge commits fail (as a killed process would stop) once ``parts`` parts are written."""

    def __init__(self, *args, parts: int):
        super().__init__(*args)
        self.parts = parts

    def write_judged_part(self, decisions):
        if self.parts == 0:
            raise KeyboardInterrupt("simulated crash")
        self.parts -= 1
        return super().write_judged_part(decisions)


def test_a_crashed_judge_resumes_without_asking_again(llm, tmp_path):
    rows = [mined_row(i, [f"n{i}-{j}" for j in range(3)], spares=[f"s{i} RELEVANT"]) for i in range(20)]
    rows[0]["hard_negatives"][0] = "n0-0 RELEVANT"
    mined = pa.Table.from_pylist(rows)
    reference = judge_corpus(mined, settings_for(llm, tmp_path / "ref"), CleanStore(tmp_path / "ref", "c1"))
    total = llm.requests
    assert total == 61  # 60 negatives, then row 0's one spare (relevant: no more spares to ask)
    llm.asked.clear()
    settings = settings_for(llm, tmp_path / "data")  # max_in_flight 4: parts of 16 decisions
    with pytest.raises(KeyboardInterrupt):
        judge_corpus(mined, settings, CrashAfter(tmp_path / "data", "c1", parts=2))
    assert llm.requests == 48  # three parts asked, the third lost with the crash
    llm.asked.clear()
    store = CleanStore(tmp_path / "data", "c1")
    resumed = judge_corpus(mined, settings, store)
    assert llm.requests == total - 32  # only what the two committed parts did not hold
    assert resumed.kept.equals(reference.kept) and resumed.dropped.equals(reference.dropped)
    judged = store.read_judged()
    assert judged.num_rows == total and set(judged["prompt_version"].to_pylist()) == {JUDGE_PROMPT_VERSION}
    llm.asked.clear()
    judge_corpus(mined, settings, store)  # all decided: nothing is asked at all
    assert llm.requests == 0


def test_decisions_are_in_the_judged_view_and_the_report(llm, tmp_path):
    data = tmp_path / "data"
    rows = [
        mined_row(0, ["n1 RELEVANT", "n2"], spares=["s1"], top="top RELEVANT", positive="pos PARTIAL"),
        mined_row(1, ["m1", "m2 PARTIAL"], task_type="sts"),
    ]
    store = CleanStore(data, "c1")
    result = judge_corpus(pa.Table.from_pylist(rows), settings_for(llm, data), store)
    kept = result.kept  # as in a clean run, verified rows carry every example column
    for column in VERIFIED_SCHEMA:
        if column.name not in kept.column_names:
            kept = kept.append_column(column, pa.nulls(kept.num_rows, column.type))
    store.write_stage("verified", StageResult(kept, result.dropped))
    catalog = Catalog(data)
    got = catalog.query(
        "SELECT clean_id, task_type, role, verdict, count(*) AS n FROM judged GROUP BY ALL ORDER BY ALL"
    ).to_pylist()
    want = Counter()
    for text, n in llm.asked.items():
        role = {"n1 RELEVANT": "negative", "n2": "negative", "s1": "replacement", "top RELEVANT": "top_retrieved"}
        role |= {"pos PARTIAL": "positive", "m1": "negative", "m2 PARTIAL": "negative"}
        want[("sts" if text.startswith("m") else "retrieval", role[text], rule(text))] += n
    assert {(r["task_type"], r["role"], r["verdict"]): r["n"] for r in got} == dict(want)
    assert {r["clean_id"] for r in got} == {"c1"}
    ranks = catalog.query("SELECT candidate, candidate_rank FROM judged ORDER BY 1").to_pylist()
    assert {r["candidate"]: r["candidate_rank"] for r in ranks}["s1"] == 60
    verified = catalog.query("SELECT example_id, judge_relabelled, judge_replaced FROM verified ORDER BY 1")
    assert verified.to_pylist() == [
        {"example_id": "run/0/0", "judge_relabelled": True, "judge_replaced": 1},
        {"example_id": "run/0/1", "judge_relabelled": False, "judge_replaced": 0},
    ]
    page = render_report(catalog, "c1")
    assert "negatives judged relevant" in page and JUDGE_PROMPT_VERSION in page
    assert "33.3%" in page  # retrieval: n1 of n1, n2, s1 (negatives and replacements) judged relevant


@pytest.mark.parametrize("mode", ["sample", "top"])
def test_mining_keeps_spares_and_the_best_retrieved_text(mode):
    rng = np.random.default_rng(0)
    n, corpus_n, width = 30, 400, 100
    vecs = rng.normal(size=(corpus_n, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    texts = [f"doc {i}" for i in range(corpus_n)]
    positive_idx = np.arange(n, dtype=np.int64)
    queries = vecs[:n] + 0.3 * rng.normal(size=(n, 16)).astype(np.float32)
    scores_all = queries @ vecs.T
    ids = np.argsort(-scores_all, axis=1)[:, :width]
    scores = np.take_along_axis(scores_all, ids, axis=1)
    table = pa.Table.from_pylist([{"example_id": f"e{i}", "query": f"q{i}"} for i in range(n)])
    cfg = load_settings(clean={"negatives_per_query": 3, "negative_mode": mode}).clean
    rows = mine_hard_negatives(table, ids, scores, texts, vecs, positive_idx, cfg).kept.to_pylist()
    assert len(rows) == n
    for i, row in enumerate(rows):
        rank_of = {texts[c]: r + 1 for r, c in enumerate(ids[i])}
        assert row["hard_negative_ranks"] == [rank_of[t] for t in row["hard_negatives"]]
        assert row["spare_negative_ranks"] == [rank_of[t] for t in row["spare_negatives"]]
        assert len(row["spare_negatives"]) == 3 and not set(row["spare_negatives"]) & set(row["hard_negatives"])
        assert all(51 <= r <= 100 for r in row["hard_negative_ranks"] + row["spare_negative_ranks"])
        assert row["spare_negative_ranks"] == sorted(row["spare_negative_ranks"])
        assert row["spare_negative_scores"] == pytest.approx([scores[i, r - 1] for r in row["spare_negative_ranks"]])
        best_other = next(r for r, c in enumerate(ids[i]) if c != i)
        assert row["top_retrieved"] == texts[ids[i, best_other]] and row["top_retrieved_rank"] == best_other + 1
        if mode == "top":  # the spares are the next usable ones after the chosen
            assert max(row["hard_negative_ranks"]) < min(row["spare_negative_ranks"])


@pytest.mark.llm
def test_the_judge_prompt_round_trips_through_vllm(llm_base_url):
    settings = load_settings(llm={"base_url": llm_base_url})
    ask = Ask("e1", "sts", None, "A man is playing a guitar.", "A man plays the guitar.", 1, "positive")

    async def go():
        async with LLMClient.from_settings(settings) as client:
            verdict = await judge_pair(client, ask, Sampling(0.0, 1.0, 128), seed=1)
            return verdict, client.stats

    (verdict, reason), stats = asyncio.run(go())
    assert verdict in VERDICTS and reason.strip()  # schema-constrained: never "error"
    assert stats.succeeded == 1 and stats.failed == 0


def test_the_clean_flow_runs_the_judge_and_exports_its_corpus(prefect_api_url, data_dir, monkeypatch):
    from flows.clean import clean

    write_run(
        data_dir,
        "run-a",
        [example("run-a", i, q, p, TOPICS[(i + 1) % len(TOPICS)][1]) for i, (q, p) in enumerate(TOPICS)],
    )
    fern = TOPICS[0][1]
    llm = RuleLLM(keyword="fern")  # the fern passage answers every query; the other positives do not
    try:
        for key, value in {
            "LLM__BASE_URL": llm.base_url,
            "LLM__MODEL": "rule-judge",
            "CLEAN__JUDGE": "true",
            "CLEAN__NEGATIVES_PER_QUERY": "2",
            "CLEAN__NEGATIVE_RANK_MIN": "1",
            "CLEAN__NEGATIVE_RANK_MAX": "10",
            "CLEAN__RANK_TOP_K": "3",
        }.items():
            monkeypatch.setenv(f"EMBED_FACTORY_{key}", value)
        summary = clean(clean_id="c-judge")
    finally:
        llm.close()
    assert "judge" in summary.stage_seconds and summary.counts["verified"] > 0
    store = CleanStore(data_dir, "c-judge")
    verified = store.read_stage("verified").to_pylist()
    records = [
        json.loads(line) for name in ("train", "heldout") for line in (store.export_dir / f"{name}.jsonl").open()
    ]
    assert len(records) == len(verified)  # the export reads the judged corpus
    assert not any(fern in r["neg"] for r in records)  # judged relevant: never a negative
    relabelled = [r for r in verified if r["judge_relabelled"]]
    assert relabelled and all(r["positive"] == fern for r in relabelled)
    judged = Catalog(data_dir).query("SELECT count(*) AS n FROM judged WHERE clean_id = 'c-judge'")
    assert judged["n"][0].as_py() == llm.requests
