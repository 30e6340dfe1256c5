"""Command-line tools over the library: the preset zoo and the run records behind docs/results.md."""
