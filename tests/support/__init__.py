"""Code the tests share (example rows, the CLI and servers as subprocesses, stub and proxy servers): see
tests/README.md."""
