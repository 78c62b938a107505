"""The vlkit command line: one thin module per command over the Python API."""
