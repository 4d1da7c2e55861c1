"""Evaluation: hand-computed metrics, the dims rule, STS and held-out retrieval with designed vectors,
per-dimension re-normalisation, clear errors, JSON results, and a real-MiniLM smoke test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ground.settings import FinetuneSettings
from storage.summaries import Evaluation
from tasks.training import eval_encode
from tasks.training import evaluate as ev
from tasks.training.evaluate import (
    EvaluationError,
    delta,
    encode,
    eval_dims,
    evaluate_model,
    evaluate_retrieval,
    evaluate_sts,
    load_sts,
    ndcg_at_k,
    recall_at_k,
    save_results,
    spearman,
    spearman_numpy,
    truncate,
)


class FakeModel:
    """``encode`` returns designed (not normalised) vectors per text and records what it was asked."""

    def __init__(self, vectors: dict[str, list[float]]):
        self.vectors = vectors
        self.calls: list[list[str]] = []

    def encode(self, texts, batch_size=32, **kwargs):
        self.calls.append(list(texts))
        return np.asarray([self.vectors[t] for t in texts], dtype=np.float32)


def write_csv(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    import csv

    with path.open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path


def cfg_for(tmp_path: Path, **kw) -> FinetuneSettings:
    base = dict(
        sts_dir=tmp_path / "sts", sts_languages=["en"], matryoshka_dims=[2], matryoshka_weights=[1.0], eval_batch_size=4
    )
    base.update(kw)
    return FinetuneSettings(**base)


# --- metrics --------------------------------------------------------------------------------------
def test_spearman_with_ties_hand_computed():
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4] -> rho = 4.5 / sqrt(4.5 * 5) = 3 / sqrt(10)
    x, y = [1, 2, 2, 3], [1, 3, 2, 4]
    expected = 3 / math.sqrt(10)
    assert spearman(x, y) == pytest.approx(expected, abs=1e-12)
    assert spearman_numpy(x, y) == pytest.approx(expected, abs=1e-12)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman_numpy([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman_numpy([1, 1, 1], [1, 2, 3]))


def test_spearman_numpy_agrees_with_scipy_on_tied_random_data():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 6, 200), rng.integers(0, 6, 200) + rng.integers(0, 2, 200)
    from scipy.stats import spearmanr

    assert spearman_numpy(x, y) == pytest.approx(spearmanr(x, y)[0], abs=1e-12)


def test_ndcg_and_recall_hand_computed():
    ranked = [0, 1, 0, 1]  # relevant at ranks 2 and 4, 2 relevant in all
    dcg = 1 / math.log2(3) + 1 / math.log2(5)
    idcg = 1 + 1 / math.log2(3)
    assert ndcg_at_k(ranked, 10, n_relevant=2) == pytest.approx(dcg / idcg)  # 0.650921
    assert ndcg_at_k(ranked, 10, n_relevant=2) == pytest.approx(0.6509209, abs=1e-6)
    assert recall_at_k(ranked, 10, n_relevant=2) == 1.0
    assert ndcg_at_k(ranked, 2, n_relevant=2) == pytest.approx((1 / math.log2(3)) / idcg)
    assert recall_at_k(ranked, 2, n_relevant=2) == 0.5
    # a relevant document that was not retrieved at all still counts in the ideal
    assert ndcg_at_k([1, 0], 10, n_relevant=3) == pytest.approx(1 / (1 + 1 / math.log2(3) + 0.5))
    assert recall_at_k([1, 0], 10, n_relevant=3) == pytest.approx(1 / 3)
    assert ndcg_at_k([1, 0, 0], 10, n_relevant=1) == 1.0
    assert ndcg_at_k([0] * 10 + [1], 10, n_relevant=1) == 0.0  # rank 11 is past the cut-off
    assert recall_at_k([0] * 10 + [1], 10, n_relevant=1) == 0.0
    # graded, ideal from the list itself
    assert ndcg_at_k([1, 2], 10) == pytest.approx((1 + 2 / math.log2(3)) / (2 + 1 / math.log2(3)))
    assert ndcg_at_k([0, 0], 10) == 0.0 and recall_at_k([0, 0], 10) == 0.0


def test_eval_dims_rule():
    assert eval_dims(384, [896, 512, 256, 128, 64]) == [384, 256, 128, 64]
    assert eval_dims(896, [896, 512, 256, 128, 64]) == [896, 512, 256, 128, 64]
    assert eval_dims(384, [384, 384, 64]) == [384, 64]
    assert eval_dims(384, []) == [384]
    assert eval_dims(32, [64, 128]) == [32]
    with pytest.raises(ValueError):
        eval_dims(384, [0])


def test_truncate_renormalises():
    v = np.array([[3.0, 4.0, 12.0, 0.0]], dtype=np.float32)  # norm 13
    out = truncate(v, 2)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.6, 0.8]], rtol=1e-6)
    np.testing.assert_allclose(truncate(v, 4), v / 13, rtol=1e-6)
    with pytest.raises(ValueError):
        truncate(v, 5)


def test_encode_normalises_and_embeds_each_unique_text_once():
    model = FakeModel({"a": [3, 4], "b": [0, 2]})
    out = encode(model, ["a", "b", "a", "a"], batch_size=8)
    assert model.calls == [["a", "b"]]
    assert out.dtype == np.float32 and out.shape == (4, 2)
    np.testing.assert_allclose(out, [[0.6, 0.8], [0, 1], [0.6, 0.8], [0.6, 0.8]], rtol=1e-6)


# --- STS ------------------------------------------------------------------------------------------
# s1 = e0 for every pair; s2_i = (1, b_i, c_i, 0). Full width: cos = 1/sqrt(1 + b^2 + c^2), rising
# with the score. At dim 2, after re-normalising: cos = 1/sqrt(1 + b^2), falling with the score.
# Without re-normalisation the dim-2 cosine would equal the full one (+1.0 instead of -1.0).
STS_B2 = [0.01, 0.25, 1.0, 4.0]
STS_C2 = [9.99, 7.75, 5.0, 0.1]


def sts_fixture(tmp_path: Path, lang: str = "en", reverse: bool = False):
    vectors, rows = {}, []
    for i, (b2, c2) in enumerate(zip(STS_B2, STS_C2, strict=True)):
        s1, s2 = f"{lang} first {i}", f"{lang} second {i}"
        vectors[s1] = [1.0, 0.0, 0.0, 0.0]
        vectors[s2] = [1.0, math.sqrt(b2), math.sqrt(c2), 0.0]
        score = float(i) if not reverse else float(3 - i)
        rows.append([s1, s2, score])
    write_csv(tmp_path / "sts" / f"stsb-{lang}-test.csv", rows)
    return vectors


def test_evaluate_sts_per_dim_with_designed_vectors(tmp_path):
    vectors = sts_fixture(tmp_path, "en")
    vectors.update(sts_fixture(tmp_path, "de", reverse=True))
    model = FakeModel(vectors)
    info = {}
    result = evaluate_sts(
        model,
        cfg_for(tmp_path, sts_languages=["en", "de"], matryoshka_dims=[8, 2], matryoshka_weights=[1.0, 0.5]),
        info=info,
    )
    assert set(result) == {"en", "de", "mean"}
    assert list(result["en"]) == [4, 2]  # 8 > width 4 is skipped, the full width counts
    assert result["en"][4] == pytest.approx(1.0)
    assert result["en"][2] == pytest.approx(-1.0)  # re-normalised per dimension
    assert result["de"][4] == pytest.approx(-1.0)
    assert result["de"][2] == pytest.approx(1.0)
    assert result["mean"] == {4: pytest.approx(0.0), 2: pytest.approx(0.0)}
    assert len(model.calls) == 1  # one encode serves every language and dimension
    assert sorted(model.calls[0]) == sorted(vectors)
    assert info["pairs"] == {"en": 4, "de": 4} and info["texts"] == 16 and info["dims"] == [4, 2]


def test_evaluate_sts_max_pairs_is_a_seeded_sample_in_file_order(tmp_path):
    rows = [[f"a{i}", f"b{i}", str(i % 6)] for i in range(50)]
    write_csv(tmp_path / "sts" / "stsb-en-test.csv", rows)
    write_csv(tmp_path / "sts" / "stsb-de-test.csv", [[f"de {a}", f"de {b}", score] for a, b, score in rows])
    s1, s2, scores = load_sts(tmp_path / "sts", "en", max_pairs=10, seed=7)
    picked = [int(t[1:]) for t in s1]
    assert len(picked) == 10 and picked == sorted(picked) and len(set(picked)) == 10  # file order, no repeats
    assert s2 == [f"b{i}" for i in picked] and scores.tolist() == [float(i % 6) for i in picked]
    assert picked != list(range(10))  # a sample over the file, not its head (STS-B is ordered by genre)
    # the same pairs on every call (before and after fine-tuning) and in every (row-aligned) language
    assert load_sts(tmp_path / "sts", "en", max_pairs=10, seed=7)[0] == s1
    assert load_sts(tmp_path / "sts", "de", max_pairs=10, seed=7)[0] == [f"de {t}" for t in s1]
    assert load_sts(tmp_path / "sts", "en", max_pairs=10, seed=8)[0] != s1
    # None, or at least the file's size: the whole file
    assert load_sts(tmp_path / "sts", "en", max_pairs=None)[0] == [f"a{i}" for i in range(50)]
    assert load_sts(tmp_path / "sts", "en", max_pairs=50, seed=7)[0] == [f"a{i}" for i in range(50)]
    with pytest.raises(ValueError, match="at least 1"):
        load_sts(tmp_path / "sts", "en", max_pairs=0)

    # evaluate_sts samples with cfg.seed: exactly the pairs load_sts gives
    model = FakeModel({t: [1.0, float(len(t))] for row in rows for t in row[:2]})
    info = {}
    evaluate_sts(model, cfg_for(tmp_path, sts_max_pairs=10, seed=7), info=info)
    assert info["pairs"] == {"en": 10}
    assert sorted(model.calls[0]) == sorted([*s1, *s2])


def test_sts_dir_none_is_the_bundled_benchmark_with_its_license(tmp_path):
    cfg = FinetuneSettings()
    assert cfg.sts_dir is None and ev.sts_dir_for(cfg) == ev.bundled_sts_dir()
    assert ev.sts_dir_for(FinetuneSettings(sts_dir=tmp_path)) == tmp_path
    bundled = ev.bundled_sts_dir()
    assert bundled.is_relative_to(Path(ev.__file__).resolve().parent)  # inside the package, not beside the checkout
    for lang in cfg.sts_languages:
        s1, _, scores = load_sts(bundled, lang)
        assert len(s1) == 1379 and 0 <= scores.min() and scores.max() <= 5, lang
    assert "CC BY-SA" in (bundled / "README.md").read_text() + (bundled / "LICENSE").read_text()
    assert "Philip May" in (bundled / "LICENSE").read_text()


def test_local_profile_samples_the_sts_pairs_production_scores_whole_splits():
    from ground.settings import load_settings

    assert load_settings(profile="local").finetune.sts_max_pairs == 150
    assert load_settings(profile="production").finetune.sts_max_pairs is None


def test_encoding_reports_progress_per_chunk_and_keeps_the_order(tmp_path, monkeypatch):
    from ground import progress

    reports = []

    class Listener:
        def add_total(self, stage, n):
            reports.append(("total", stage, n))

        def advance(self, stage, n=1, ok=True):
            reports.append(("advance", stage, n))

    monkeypatch.setattr(eval_encode, "_ENCODE_CHUNK_BATCHES", 2)
    texts = [f"text {'x' * (i % 7)} {i}" for i in range(23)]
    model = FakeModel({t: [float(i + 1), 1.0] for i, t in enumerate(texts)})
    remove = progress.add_listener(Listener())
    try:
        vectors = encode(model, [*texts, texts[0]], batch_size=3, stage="evaluate")  # one duplicate
    finally:
        remove()
    # 23 unique texts in chunks of 2 batches x 3 = 6, longest first; one report per chunk
    assert [len(call) for call in model.calls] == [6, 6, 6, 5]
    assert [len(t) for call in model.calls for t in call] == sorted((len(t) for t in texts), reverse=True)
    assert reports == [("total", "evaluate", 23)] + [("advance", "evaluate", n) for n in (6, 6, 6, 5)]
    expected = np.asarray([[i + 1, 1.0] for i in range(23)], dtype=np.float32)
    expected /= np.linalg.norm(expected, axis=1, keepdims=True)
    assert np.allclose(vectors[:23], expected) and np.allclose(vectors[23], expected[0])
    # no stage: no reports
    reports.clear()
    remove = progress.add_listener(Listener())
    try:
        encode(FakeModel(model.vectors), texts, batch_size=3)
    finally:
        remove()
    assert reports == []


def test_missing_sts_file_names_the_file(tmp_path):
    sts_fixture(tmp_path, "en")
    model = FakeModel({})
    with pytest.raises(FileNotFoundError) as err:
        evaluate_sts(model, cfg_for(tmp_path, sts_languages=["en", "xx"]))
    assert str(tmp_path / "sts" / "stsb-xx-test.csv") in str(err.value)
    assert "stsb-en-test.csv" in str(err.value)  # what is there
    assert model.calls == []  # failed before embedding anything


@pytest.mark.parametrize(
    "row, why",
    [
        (["only", "two"], "expected 3 columns"),
        (["a", "b", "high"], "is not a number"),
        (["a", "b", "7"], "outside 0..5"),
        (["", "b", "1"], "empty sentence"),
    ],
)
def test_malformed_sts_file_names_file_and_line(tmp_path, row, why):
    path = write_csv(tmp_path / "sts" / "stsb-en-test.csv", [["x", "y", "1.0"], row])
    with pytest.raises(EvaluationError) as err:
        load_sts(tmp_path / "sts", "en")
    assert f"{path}:2" in str(err.value) and why in str(err.value)


def test_empty_sts_file_is_an_error(tmp_path):
    (tmp_path / "sts").mkdir()
    (tmp_path / "sts" / "stsb-en-test.csv").write_text("")
    with pytest.raises(EvaluationError, match="no sentence pairs"):
        load_sts(tmp_path / "sts", "en")


# --- held-out retrieval ---------------------------------------------------------------------------
def heldout_fixture(tmp_path: Path) -> tuple[Path, dict[str, list[float]]]:
    """Two retrieval queries and one sts row (its texts join the corpus, its query does not count).

    q1 (relevant p1): full-width order p1, n1, ... ; at dim 2, n1 (0.9, 0.1) beats p1 (0.6, 0.8).
    q2 (relevant p2a, p2b): p2a first, p2b last at every width.
    """
    vectors = {
        "Instruct: find\nQuery: q1": [1.0, 0.0, 0.0, 0.0],
        "Instruct: find\nQuery: q2": [0.0, 0.0, 0.0, 1.0],
        "Instruct: sts\nQuery: s": [0.0, 1.0, 0.0, 0.0],
        "p1": [0.6, 0.8, 0.0, 0.0],  # cos(q1) 0.6 full and at dim 2
        "n1": [0.9, 0.1, 0.0, 2.0],  # cos(q1) 0.9/sqrt(4.82)=0.41 full; 0.9/sqrt(0.82)=0.99 at dim 2
        "p2a": [0.0, 0.0, 0.0, 1.0],  # cos(q2) 1
        "p2b": [0.0, 0.0, 1.0, -1.0],  # cos(q2) -0.71: ranked last
        "n2": [0.0, 0.0, 1.0, 0.5],  # cos(q2) 0.45
        "sp": [0.0, 1.0, 1.0, 0.0],  # sts positive, in the corpus
        "sn": [0.1, 1.0, 0.0, 0.0],
    }
    rows = [
        {
            "query": "Instruct: find\nQuery: q1",
            "pos": ["p1"],
            "neg": ["n1"],
            "task_name": "retrieval",
            "example_id": "e1",
        },
        {
            "query": "Instruct: find\nQuery: q2",
            "pos": ["p2a", "p2b"],
            "neg": ["n2", "n1"],
            "task_name": "retrieval",
            "example_id": "e2",
        },
        {"query": "Instruct: sts\nQuery: s", "pos": ["sp"], "neg": ["sn"], "task_name": "sts", "example_id": "e3"},
    ]
    path = tmp_path / "heldout.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path, vectors


def expected_retrieval() -> dict[int, dict[str, float]]:
    # Full width, corpus of 7 texts. q1: p1 (0.6) beats n1 (0.41), rank 1 -> nDCG 1.
    # q2: p2a 1.0, n1 0.91, n2 0.45, p1/sp/sn 0, p2b -0.71 -> p2a rank 1, p2b rank 7:
    # dcg 1 + 1/log2(8), idcg 1 + 1/log2(3).
    q2 = (1 + 1 / math.log2(8)) / (1 + 1 / math.log2(3))
    return {4: {"ndcg@10": (1.0 + q2) / 2, "recall@10": 1.0}}


def test_evaluate_retrieval_hand_computed(tmp_path):
    path, vectors = heldout_fixture(tmp_path)
    model = FakeModel(vectors)
    info = {}
    result = evaluate_retrieval(model, path, cfg_for(tmp_path), info=info)
    assert info["queries"] == 2 and info["corpus"] == 7
    assert len(model.calls) == 1 and sorted(model.calls[0]) == sorted(t for t in vectors if "sts" not in t)
    exp = expected_retrieval()
    assert result[4]["ndcg@10"] == pytest.approx(exp[4]["ndcg@10"])
    assert result[4]["recall@10"] == 1.0 and result[4]["queries"] == 2
    # dim 2: q1 = (1, 0): n1 (0.99) now beats p1 (0.6) -> p1 rank 2 -> 1/log2(3).
    # q2 truncates to the zero vector -> every cosine 0, ties kept in corpus order
    # (p1 n1 p2a p2b n2 sp sn) -> p2a rank 3, p2b rank 4 -> dcg 1/log2(4) + 1/log2(5)
    q2_dim2 = (1 / math.log2(4) + 1 / math.log2(5)) / (1 + 1 / math.log2(3))
    assert result[2]["ndcg@10"] == pytest.approx((1 / math.log2(3) + q2_dim2) / 2)
    # k = 2: q1 full hit at rank 1; q2 only p2a in the top 2 -> recall 0.5
    result_k2 = evaluate_retrieval(FakeModel(vectors), path, cfg_for(tmp_path), k=2)
    assert result_k2[4]["recall@2"] == pytest.approx((1.0 + 0.5) / 2)
    assert result_k2[4]["ndcg@2"] == pytest.approx((1.0 + 1 / (1 + 1 / math.log2(3))) / 2)


def test_evaluate_retrieval_task_types_and_no_queries(tmp_path):
    path, vectors = heldout_fixture(tmp_path)
    sts_only = evaluate_retrieval(FakeModel(vectors), path, cfg_for(tmp_path), task_types=("sts",))
    # query "s" = e1: sn .995, p1 .8, sp .71 -> sp rank 3 of 7 -> nDCG 1/log2(4)
    assert sts_only[4]["queries"] == 1
    assert sts_only[4]["ndcg@10"] == pytest.approx(0.5)
    none = evaluate_retrieval(
        FakeModel({**vectors, "width probe": [1, 0, 0, 0]}), path, cfg_for(tmp_path), task_types=("bitext",)
    )
    assert none == {
        4: {"ndcg@10": None, "recall@10": None, "queries": 0},
        2: {"ndcg@10": None, "recall@10": None, "queries": 0},
    }


# --- whole model, delta, JSON ---------------------------------------------------------------------
def test_evaluate_model_delta_and_save(tmp_path):
    vectors = sts_fixture(tmp_path)
    path, more = heldout_fixture(tmp_path)
    vectors.update(more)
    cfg = cfg_for(tmp_path)
    before = evaluate_model(FakeModel(vectors), cfg, heldout_path=path)
    assert before.dims == [4, 2] and before.width == 4 and before.precision == "fp32"
    assert before.sts.pairs == {"en": 4}
    assert before.sts.spearman["en"] == {"4": pytest.approx(1.0), "2": pytest.approx(-1.0)}
    assert before.ndcg["4"] == pytest.approx(expected_retrieval()[4]["ndcg@10"])
    # JSON-native: survives a round trip unchanged
    assert Evaluation.model_validate(json.loads(before.model_dump_json())) == before

    # "after": s2 vectors made worse at full width by swapping ranks 0 and 3
    worse = dict(vectors)
    worse["en second 0"], worse["en second 3"] = vectors["en second 3"], vectors["en second 0"]
    after = evaluate_model(FakeModel(worse), cfg, heldout_path=path)
    d = delta(before, after)
    assert d.sts["en"]["4"] == pytest.approx(after.sts.spearman["en"]["4"] - 1.0)
    assert d.sts["en"]["4"] < 0
    assert d.retrieval["4"] == {"ndcg@10": pytest.approx(0.0), "recall@10": pytest.approx(0.0)}
    assert "queries" not in d.retrieval["4"]
    assert d.key_deltas()["sts_spearman_mean"]["4"] == pytest.approx(d.sts["mean"]["4"], abs=1e-6)

    out = save_results(tmp_path / "eval" / "results.json", before, after)
    saved = json.loads(out.read_text())
    assert Evaluation.model_validate(saved["before"]) == before and Evaluation.model_validate(saved["after"]) == after
    assert saved["delta"]["sts"]["en"]["4"] == pytest.approx(d.sts["en"]["4"])
    assert delta(saved["before"], saved["after"]) == d  # same from the re-loaded JSON

    with pytest.raises(ValueError, match="precision|bf16"):
        delta(before, after.model_copy(update={"precision": "bf16"}))
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate_model(FakeModel(vectors), cfg, sts=False)


# the precision follows the CPU when not given (bf16 where native): both branches forced on every machine
@pytest.mark.parametrize("native_bf16", [False, True], ids=["fp32", "bf16"])
def test_real_minilm_smoke_on_20_english_pairs(monkeypatch, native_bf16):
    monkeypatch.setattr(ev, "bf16_supported", lambda: native_bf16)
    cfg = FinetuneSettings(sts_languages=["en"], sts_max_pairs=20)  # the bundled benchmark
    result = evaluate_model(None, cfg)
    assert result.precision == ("bf16" if native_bf16 else "fp32")
    assert result.width == 384 and result.dims == [384, 256, 128, 64]
    assert result.sts.pairs == {"en": 20}
    rho = result.sts.spearman["en"]["384"]
    assert 0.5 < rho <= 1.0
    assert all(0.3 < result.sts.spearman["en"][str(d)] <= 1.0 for d in (256, 128, 64))
