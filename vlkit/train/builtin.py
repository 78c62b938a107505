"""The built-in training-method plugin: adapter, full, linear, linear-sgd, zeroshot and fuse (`vlkit.train.methods`).

A third-party method registers the same way from its own plugin module:

    from vlkit.hookspecs import hookimpl

    @hookimpl
    def register_methods(register):
        register("my_method", MyMethod(), "one-line summary")

where `MyMethod` subclasses `vlkit.train.methods.TrainingMethod`.
"""

from __future__ import annotations

from ..hookspecs import hookimpl


@hookimpl
def register_methods(register):
    from .methods import BUILTIN_METHODS

    for method in BUILTIN_METHODS:
        register(method.name, method, method.summary)
