"""Command-line tools over the library: the preset zoo and the run records of docs/results.md."""
