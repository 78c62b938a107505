"""Root typer app: builds the command tree through the register_commands hook and maps errors to exit codes."""

from __future__ import annotations

import errno
import os
import sys
import warnings
from typing import Any

import typer

from .. import __version__
from ..errors import VlkitError, VlkitWarning
from .quiet import quiet_plugin_log, quiet_third_party

_python_showwarning = warnings.showwarning


def _version(value: bool) -> None:
    if value:
        typer.echo(f"vlkit {__version__}")
        raise typer.Exit()


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="vlkit",
        help="Adapters for frozen vision-language backbones: inject, train, adapt, compose, probe, export.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )

    @app.callback()
    def root(
        version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Show the version."),
    ) -> None:
        """vlkit command line."""

    from ..plugins import get_plugins

    quiet_plugin_log()
    system = get_plugins()
    for msg in system.warnings:  # printed here, once: the plugin system's own log record is not
        sys.stderr.write(f"warning: {msg}\n")
    system.pm.hook.register_commands(cli=app)
    return app


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


OS_ERRORS: dict[int | None, str] = {  # errno -> what it means for the user (the rest: the system's own message)
    errno.EROFS: "read-only file system",
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EEXIST: "already exists",
    errno.ENOTDIR: "not a directory",
    errno.EISDIR: "is a directory",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}


def error_message(exc: BaseException) -> str:
    """The one line shown for an error (the single table that maps error types to messages)."""
    if isinstance(exc, VlkitError):
        return f"error: {_one_line(exc)}"  # messages may quote multi-line library errors
    if isinstance(exc, FileNotFoundError):
        return f"error: file not found: {exc.filename or exc}"
    if isinstance(exc, UnicodeDecodeError):
        return f"error: a file is not UTF-8 text ({exc.reason} at byte {exc.start})"
    if isinstance(exc, OSError):
        what = OS_ERRORS.get(exc.errno) or exc.strerror or _one_line(exc)
        where = " -> ".join(str(f) for f in (exc.filename, exc.filename2) if f)
        return f"error: {what}: {where}" if where else f"error: {what}"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted"
    return f"error: unexpected {type(exc).__name__}: {_one_line(exc)} (set VLKIT_DEBUG=1 for the traceback)"


def _click_exceptions() -> tuple[tuple[type[Any], ...], tuple[type[Any], ...], tuple[type[Any], ...]]:
    """(exit, abort, usage-error) classes: typer >= 0.2x vendors click as typer._click, older typer uses click."""
    exits: list[type[Any]] = [typer.Exit]
    aborts: list[type[Any]] = [typer.Abort]
    usage: list[type[Any]] = [typer.TyperException]
    try:
        import click
    except ImportError:  # pragma: no cover - typer without click
        pass
    else:
        exits.append(click.exceptions.Exit)
        aborts.append(click.exceptions.Abort)
        usage.append(click.ClickException)
    return tuple(exits), tuple(aborts), tuple(usage)


def usage_message(exc: BaseException) -> str:
    """One line for a command-line usage error (bad option value, unknown option or command)."""
    fmt = getattr(exc, "format_message", None)
    text = _one_line(fmt() if callable(fmt) else exc)
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return f"error: {text}{hint}"


def exit_code(exc: BaseException) -> int:
    if isinstance(exc, (VlkitError, OSError, UnicodeDecodeError)):
        return 2  # bad input or the environment (read-only, full disk, not a directory): not a bug
    if isinstance(exc, KeyboardInterrupt):
        return 130
    return 1


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """vlkit's own warnings as one `warning: ...` line on stderr; others as Python prints them."""
    if isinstance(category, type) and issubclass(category, VlkitWarning):
        sys.stderr.write(f"warning: {message}\n")
        return
    _python_showwarning(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> None:
    debug = os.environ.get("VLKIT_DEBUG", "") not in ("", "0")
    quiet_third_party()
    warnings.showwarning = _show_warning
    try:
        app = build_app()
        rc = app(args=argv, standalone_mode=False)
        # without standalone mode, click returns the code of `raise typer.Exit(code)` instead of exiting
        if isinstance(rc, int) and not isinstance(rc, bool) and rc != 0:
            sys.exit(rc)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the CLI boundary
        exits, aborts, usage = _click_exceptions()
        if isinstance(exc, exits):
            sys.exit(exc.exit_code)
        if isinstance(exc, aborts):
            sys.stderr.write("aborted\n")
            sys.exit(130)
        if isinstance(exc, usage) and type(exc).__name__ == "NoArgsIsHelpError":
            text = exc.format_message()  # typer's rich help is already printed; plain click's is here
            if text.strip():
                sys.stdout.write(text.rstrip() + "\n")
            sys.exit(exc.exit_code)
        if isinstance(exc, usage):
            if debug:
                import traceback

                traceback.print_exc()
            sys.stderr.write(usage_message(exc) + "\n")
            sys.exit(exc.exit_code)
        if debug:
            import traceback

            traceback.print_exc()
            worker_traceback = getattr(exc, "worker_traceback", None)
            if worker_traceback:
                sys.stderr.write(worker_traceback.rstrip() + "\n")
        sys.stderr.write(error_message(exc) + "\n")
        sys.exit(exit_code(exc))
