"""The typed results the fine-tune path hands on: evaluations (eval.json), training figures and the
``finetune`` flow's summary (finetune.json).

Written once here, as pydantic models, and read as objects everywhere: the flow returns a
:class:`FinetuneSummary`, the CLI, the Prefect artifacts, the pipeline page and the ablation read its
attributes, and a summary or evaluation re-loaded from JSON (or from a flow run's result, as a dict)
validates back into the same object (:meth:`FinetuneSummary.of`). Matryoshka dimensions are string keys
(``"384"``), as in the JSON files, so a saved and re-loaded result equals the returned one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, field_validator

#: one value per Matryoshka dimension, keyed by the dimension as a string (as in the JSON files)
ByDim = dict[str, float | None]


def _finite(value: Any) -> Any:
    """NaN / inf as None, recursively: a result that survives a JSON round trip unchanged."""
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class _Result(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")


class StsResult(_Result):
    """STS Benchmark Spearman per language (and ``"mean"``) and dimension, with what was evaluated."""

    split: str
    languages: list[str]
    pairs: dict[str, int]
    spearman: dict[str, ByDim]  # language | "mean" -> dim -> Spearman
    dir: str = ""
    max_pairs: int | None = None
    seed: int | None = None
    texts: int = 0
    seconds: float = 0.0

    @field_validator("spearman", mode="before")
    @classmethod
    def _finite_scores(cls, value: Any) -> Any:
        return _finite(value)

    @property
    def mean(self) -> ByDim:
        return self.spearman.get("mean", {})


class RetrievalResult(_Result):
    """Held-out retrieval: per dimension nDCG@k, recall@k and the number of queries scored."""

    heldout: str
    task_types: list[str]
    queries: int
    corpus: int
    metrics: dict[str, dict[str, float | int | None]]  # dim -> {"ndcg@10", "recall@10", "queries"}
    k: int = 10
    seconds: float = 0.0

    @field_validator("metrics", mode="before")
    @classmethod
    def _finite_metrics(cls, value: Any) -> Any:
        return _finite(value)

    def metric(self, name: str) -> ByDim:
        return {dim: values.get(name) for dim, values in self.metrics.items()}


class Evaluation(_Result):
    """One model's evaluation (``tasks.training.evaluate.evaluate_model``); a section not run is None."""

    model: str
    precision: str  # "bf16" | "fp32": results at different precisions are not compared
    max_seq_length: int | None = None
    matryoshka_dims: list[int] = []
    width: int | None = None
    dims: list[int] = []
    seconds: float = 0.0
    sts: StsResult | None = None
    retrieval: RetrievalResult | None = None

    @property
    def sts_mean(self) -> ByDim:
        return self.sts.mean if self.sts else {}

    @property
    def ndcg(self) -> ByDim:
        return self.retrieval.metric(f"ndcg@{self.retrieval.k}") if self.retrieval else {}


class EvalDelta(_Result):
    """after - before for every metric both evaluations have (``tasks.training.evaluate.delta``)."""

    sts: dict[str, ByDim] | None = None  # language | "mean" -> dim -> change
    retrieval: dict[str, ByDim] | None = None  # dim -> metric -> change

    def key_deltas(self) -> dict[str, ByDim]:
        """The headline changes: STS mean Spearman and held-out nDCG@10 per dim (rounded to 6 places)."""
        out: dict[str, ByDim] = {}
        if self.sts and self.sts.get("mean"):
            out["sts_spearman_mean"] = {dim: _round(v) for dim, v in self.sts["mean"].items()}
        if self.retrieval:
            out["heldout_ndcg@10"] = {dim: _round(m.get("ndcg@10")) for dim, m in self.retrieval.items()}
        return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)


class HeldoutLoss(_Result):
    """Mean loss over the fixed held-out batches, overall and per task type (``None`` where there were none)."""

    mean: float | None
    by_task: dict[str, float] = {}
    batches: int = 0
    rows: int = 0
    source: str = ""


class TrainFigures(_Result):
    """What a training run measured (``tasks.training.train.TrainResult`` without the per-step losses)."""

    steps: int
    samples: int
    samples_per_s: float | None = None
    train_seconds: float | None = None
    first_loss: float | None = None
    last_loss: float | None = None
    loss_start: float | None = None
    loss_end: float | None = None
    loss_window: int = 0
    heldout_loss_before: HeldoutLoss | None = None  # the same fixed batches before and after training
    heldout_loss_after: HeldoutLoss | None = None


class FinetuneSummary(_Result):
    """What the ``finetune`` flow returns; also written to the model folder as finetune.json."""

    clean_id: str
    base_model: str
    train_path: str
    heldout_path: str | None
    model_dir: str
    eval_path: str
    train: TrainFigures
    key_deltas: dict[str, ByDim]
    before: Evaluation
    after: Evaluation
    delta: EvalDelta
    model_url: str | None = None  # with S3 storage: the model's copy next to the export (s3://…/models/<name>)

    @classmethod
    def of(cls, value: FinetuneSummary | Mapping[str, Any]) -> FinetuneSummary:
        """The summary itself, or one read back from JSON or a flow run's result (a dict)."""
        return value if isinstance(value, cls) else cls.model_validate(value)
