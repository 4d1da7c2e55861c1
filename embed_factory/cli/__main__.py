"""``python -m embed_factory.cli``: the same command line as the ``embed-factory`` script."""

from embed_factory.cli import main

main()
