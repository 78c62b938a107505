"""Run the vlkit CLI in-process and capture its exit code, stdout and stderr (shared by the test modules)."""
from __future__ import annotations


def cli(argv, capsys):
    from vlkit.cli.app import main

    code = 0
    try:
        main(argv)
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err
