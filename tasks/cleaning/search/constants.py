"""The constants of exact search, all back ends: result padding, block shapes, chunk sizes, bf16 facts."""

from __future__ import annotations

import numpy as np

#: faiss's filler for missing results (``-FLT_MAX``); every back end pads with it and id -1
MISSING_SCORE = float(np.finfo(np.float32).min)
#: queries per ``index.search`` call in :func:`tasks.cleaning.search.search`: bounds result arrays and scratch memory
SEARCH_BATCH = 8192

# --- bf16 CPU back end (bf16.py, bf16_scan.py) -----------------------------------------------------
#: bf16 unit roundoff (round to nearest even)
BF16_U = 2.0**-8
#: target size of one bf16 score block (query chunk × corpus block), bytes; two are alive at a time
SCORE_BLOCK_BYTES = 128 * 2**20
#: queries per chunk (2048 × 32768 corpus items per 128 MB block)
QUERY_CHUNK = 2048
#: strided slabs per corpus block for the group-max screen
GROUPS = 16
#: candidate entries per query chunk above which the store is compacted
COMPACT_ENTRIES = 4_000_000
#: float32 rows per chunk when scanning the corpus at construction
BUILD_CHUNK = 65536

# --- torch device back end (torch_device.py) -------------------------------------------------------
#: extra results kept per block and in the running best, so ties at the k-th score stay in id order
TIE_SLACK = 16
#: (queries per chunk, corpus items per block) by device type: 1 GiB score blocks on a GPU, 64 MiB on a CPU
BLOCK_SHAPE = {"cuda": (4096, 65536), "cpu": (1024, 16384)}
