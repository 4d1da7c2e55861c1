"""A training loss that can be compared across a run: the loss on fixed, seeded held-out batches.

The per-step loss of a fine-tune is not a trend: each step's batch has its own task type (semi-homogeneous
batches) and its own number of hard negatives, and the last batches of an epoch are smaller, so the first
and the last steps compare different things (a run whose STS went up logged ``4.46 -> 10.02``).
:func:`fixed_batch_loss` scores the *same* batches with the model before and after training: the rows of
the export's held-out split (or, where it has fewer than 2 rows, a seeded sample of the training rows,
said so in ``source``), grouped by task type, shuffled with ``seed`` and cut into batches of
``batch_size``; at most ``max_batches`` per type; rows left alone in their type (a small split) are pooled
into mixed-type batches. The loss is the training loss itself (Matryoshka over
InfoNCE, :func:`tasks.training.losses.build_loss`), without gradients, under bf16 autocast when training
runs in bf16, so before and after are measured the same way.
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from storage.summaries import HeldoutLoss
from tasks.training.losses import build_loss

#: batches per task type at most: enough to average out the rows, cheap next to training
MAX_BATCHES_PER_TYPE = 8
#: the "type" of the batches pooled from types with a single row (a small held-out split has many)
MIXED = "mixed types"


@dataclass(frozen=True)
class FixedBatches:
    """Row indices of ``rows`` (a :class:`tasks.training.train.TrainingRows`) per task type, batch by batch."""

    columns: dict[str, list[str]]
    batches: dict[str, list[list[int]]]
    source: str  # "heldout" or "train sample"

    @property
    def count(self) -> int:
        return sum(len(b) for b in self.batches.values())


def fixed_batches(
    columns: dict[str, list[str]],
    task_labels: list[str],
    batch_size: int,
    seed: int,
    source: str,
    max_batches: int = MAX_BATCHES_PER_TYPE,
) -> FixedBatches:
    """Seeded single-task batches of at least 2 rows (InfoNCE needs an in-batch negative)."""
    by_task: dict[str, list[int]] = defaultdict(list)
    for i, task in enumerate(task_labels):
        by_task[task].append(i)
    rng = random.Random(seed)
    batches: dict[str, list[list[int]]] = {}
    size = max(2, int(batch_size))
    leftover: list[int] = []  # rows of a type too small for a batch of its own: pooled into mixed batches
    for task in sorted(by_task):
        rows = by_task[task][:]
        rng.shuffle(rows)
        cut = [rows[i : i + size] for i in range(0, len(rows), size)]
        leftover += [i for b in cut if len(b) < 2 for i in b]
        cut = [b for b in cut if len(b) >= 2][:max_batches]
        if cut:
            batches[task] = cut
    mixed = [leftover[i : i + size] for i in range(0, len(leftover), size)]
    mixed = [b for b in mixed if len(b) >= 2][:max_batches]
    if mixed:
        batches[MIXED] = mixed
    return FixedBatches(columns, batches, source)


def fixed_batch_loss(
    model: Any, batches: FixedBatches, cfg: Any, bf16: bool = False, loss: Any | None = None
) -> HeldoutLoss:
    """The training loss of ``model`` on every fixed batch, averaged per task type and over all batches;
    ``loss``: the trainer's own loss object (default: built from ``cfg``, as the trainer builds it)."""
    import torch

    if not batches.count:
        return HeldoutLoss(mean=None, source=batches.source)
    loss = loss if loss is not None else build_loss(model, cfg)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    by_task: dict[str, float] = {}
    total, rows = 0.0, 0
    try:
        for task, task_batches in batches.batches.items():
            values = []
            for picks in task_batches:
                features = []
                for texts in batches.columns.values():
                    tokens = model.preprocess([texts[i] for i in picks])
                    features.append({k: v.to(device) if hasattr(v, "to") else v for k, v in tokens.items()})
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bool(bf16)):
                    values.append(float(loss(features, None)))
                rows += len(picks)
            by_task[task] = sum(values) / len(values)
            total += sum(values)
    finally:
        model.train(was_training)
    return HeldoutLoss(
        mean=total / batches.count, by_task=by_task, batches=batches.count, rows=rows, source=batches.source
    )


def describe_heldout_loss(before: HeldoutLoss | None, after: HeldoutLoss | None) -> str:
    """``held-out loss 3.91 -> 2.10 (12 fixed batches of heldout rows; by type: ...)``: for the log, the CLI,
    the model card and the Prefect artifact."""
    if before is None or after is None or before.mean is None or after.mean is None:
        return "held-out loss n/a (no task type has 2 rows to batch)"
    types = ", ".join(f"{t} {v:.4f} -> {after.by_task.get(t, float('nan')):.4f}" for t, v in before.by_task.items())
    return (
        f"held-out loss {before.mean:.4f} -> {after.mean:.4f} "
        f"({before.batches} fixed batches of {before.source} rows; by type: {types})"
    )
