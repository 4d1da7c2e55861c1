"""The fixed batches behind the comparable training loss (tasks/training/heldout_loss.py)."""

from __future__ import annotations

import json

from storage.summaries import TrainFigures
from tasks.training.heldout_loss import MIXED, describe_heldout_loss, fixed_batches


def test_batches_are_seeded_per_type_and_singletons_are_pooled_into_mixed_batches():
    labels = ["a", "a", "a", "b", "c", "d", "e"]
    columns = {"anchor": [f"q{i}" for i in range(len(labels))]}
    batches = fixed_batches(columns, labels, batch_size=2, seed=5, source="heldout")
    assert set(batches.batches) == {"a", MIXED}  # a small split: most types have one row
    assert len(batches.batches["a"]) == 1 and all(labels[i] == "a" for i in batches.batches["a"][0])
    used = [i for task_batches in batches.batches.values() for b in task_batches for i in b]
    assert len(used) == len(set(used)) and all(len(b) >= 2 for tb in batches.batches.values() for b in tb)
    assert len(used) == 6  # 7 rows in batches of >= 2: one row has no partner
    assert fixed_batches(columns, labels, 2, 5, "heldout") == batches  # the same batches before and after
    assert fixed_batches(columns, labels, 2, 6, "heldout") != batches
    assert fixed_batches(columns, ["a"], 2, 5, "heldout").count == 0  # one row: no batch


def test_the_description_of_losses_read_back_from_a_summary_json():
    loss = {"mean": 2.0, "by_task": {"a": 2.0}, "batches": 1, "rows": 2, "source": "heldout"}
    figures = {"steps": 1, "samples": 2, "heldout_loss_before": loss}
    figures["heldout_loss_after"] = {**loss, "mean": 1.5, "by_task": {"a": 1.5}}
    train = TrainFigures.model_validate(json.loads(json.dumps(figures)))  # as finetune.json holds it
    before, after = train.heldout_loss_before, train.heldout_loss_after
    assert describe_heldout_loss(before, after) == (
        "held-out loss 2.0000 -> 1.5000 (1 fixed batches of heldout rows; by type: a 2.0000 -> 1.5000)"
    )
    assert describe_heldout_loss(None, after).startswith("held-out loss n/a")
