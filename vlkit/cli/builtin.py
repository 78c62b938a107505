"""Built-in plugin that adds vlkit's own commands through the same register_commands hook as third parties."""

from __future__ import annotations

import importlib

from ..hookspecs import hookimpl

COMMAND_MODULES = (
    "plugins_cmd",
    "inject_cmd",
    "inspect_cmd",
    "data_cmd",
    "train_cmd",
    "adapt_cmd",
    "compose_cmd",
    "probe_cmd",
    "eval_cmd",
    "export_cmd",
    "serve_cmd",
)


@hookimpl
def register_commands(cli):
    for mod in COMMAND_MODULES:
        full = f"vlkit.cli.{mod}"
        try:
            module = importlib.import_module(full)
        except ModuleNotFoundError as exc:
            if exc.name == full:
                continue
            raise
        module.register(cli)
