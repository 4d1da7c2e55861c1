"""Importing existing training data (``embed-factory import``): readers of JSONL, Parquet and ``datasets``
folders (:mod:`.readers`), their column layouts mapped onto example rows (:mod:`.layouts`), and the shards of
an imported run (:mod:`.shards`). Independent of the other phases of ``tasks/``."""
