"""bench/gpu_check.py, the prepared GPU check, runs its same code at toy sizes on the CPU."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.py"


def test_gpu_check_runs_search_split_and_decoder_training_on_cpu_at_toy_size(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check", BENCH)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    out = tmp_path / "gpu.json"
    results = gpu_check.main(["--device", "cpu", "--tiny", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(results))
    search = results["search"]
    assert search["equal_to_exact"] and search["mismatched_rows"] == 0 and search["sample"] == 50
    split = results["split"]
    assert split["equal"] and split["queries"] == 9000
    assert split["seconds_1_block"] > 0 and split["seconds_2_blocks"] > 0
    training = results["training"]
    assert training["steps_timed"] == 2 and training["samples_per_s"] > 0
    assert math.isfinite(training["loss_first"]) and math.isfinite(training["loss_last"])
