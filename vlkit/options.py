"""Plugin options as data: one dataclass per plugin, each field's help its attribute docstring.

A plugin declares its options as a dataclass (an adapter variant's `config_cls`, a task's `Options`):

    @dataclass
    class LoraConfig(AdapterConfig):
        rank: int = 8
        \"\"\"Rank r of the update B·A.\"\"\"

`option_specs(cls)` reads them back (name, type, default, help), walking the class hierarchy, and is what the
CLI's generated flags (`vlkit inject --adapter lora --help`), `vlkit plugins --json` and the docs use. A field
may give its help as `field(metadata={"help": ...})` instead of a docstring.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from dataclasses import dataclass
from typing import Any

from .errors import ConfigError


@dataclass(frozen=True)
class OptionSpec:
    """One declared option."""

    name: str
    type: str
    default: Any
    help: str
    required: bool = False

    def to_dict(self) -> dict[str, Any]:
        default = self.default if _jsonable(self.default) else repr(self.default)
        return {"name": self.name, "type": self.type, "default": default, "help": self.help, "required": self.required}


def _jsonable(value: Any) -> bool:
    return (
        value is None
        or isinstance(value, (bool, int, float, str))
        or (isinstance(value, (list, tuple)) and all(_jsonable(v) for v in value))
        or (isinstance(value, dict) and all(isinstance(k, str) and _jsonable(v) for k, v in value.items()))
    )


def attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> the string literal written right after its annotated assignment, over `cls`'s MRO (the
    subclass's text wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object:
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        tree = ast.parse(src)
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, body[1:]):
            if (
                isinstance(stmt, ast.AnnAssign)
                and isinstance(stmt.target, ast.Name)
                and isinstance(nxt, ast.Expr)
                and isinstance(nxt.value, ast.Constant)
                and isinstance(nxt.value.value, str)
            ):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def option_specs(cls: type) -> list[OptionSpec]:
    """The options a dataclass declares, in field order."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass of options")
    hints = typing.get_type_hints(cls)
    docs = attribute_docs(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.name.startswith("_"):
            continue
        if f.default is not dataclasses.MISSING:
            default, required = f.default, False
        elif f.default_factory is not dataclasses.MISSING:
            default, required = f.default_factory(), False
        else:
            default, required = None, True
        help_text = str(f.metadata.get("help") or docs.get(f.name, ""))
        out.append(OptionSpec(f.name, _type_name(hints.get(f.name, f.type)), default, help_text, required))
    return out


def option_names(cls: type) -> tuple[str, ...]:
    """The names of the options a dataclass declares, in field order (what a plugin's option check accepts)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass of options")
    return tuple(f.name for f in dataclasses.fields(cls) if not f.name.startswith("_"))


def parse_flag_args(args: list[str], specs: list[OptionSpec], what: str) -> dict[str, Any]:
    """`--name value` / `--name=value` / `--flag` pairs for declared options (dashes or underscores), as strings
    for the options' own type coercion; an undeclared flag is a ConfigError listing the declared ones."""
    by_flag = {s.name.replace("_", "-"): s for s in specs}
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}")
        key, eq, value = arg[2:].partition("=")
        spec = by_flag.get(key.replace("_", "-"))
        if spec is None:
            raise ConfigError(
                f"unknown option --{key} for {what}; its options: " + ", ".join(f"--{f}" for f in by_flag)
            )
        if not eq:
            if spec.type == "bool" and (i + 1 >= len(args) or args[i + 1].startswith("--")):
                value = "true"
            elif i + 1 < len(args):
                i += 1
                value = args[i]
            else:
                raise ConfigError(f"option --{key} needs a value")
        out[spec.name] = _check_scalar(spec, value, f"--{key}")
        i += 1
    return out


def _check_scalar(spec: OptionSpec, value: str, flag: str) -> Any:
    """Scalar flags are checked here so the message names the flag; the rest go to the dataclass's own checks."""
    kind = spec.type.replace(" | None", "")
    if spec.type.endswith("| None") and value.lower() in ("none", "null"):
        return None
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
    except ValueError:
        raise ConfigError(f"{flag} must be {'an integer' if kind == 'int' else 'a number'}, got {value!r}") from None
    if kind == "bool":
        if value.lower() not in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            raise ConfigError(f"{flag} must be true or false, got {value!r}")
        return value.lower() in ("true", "1", "yes", "on")
    return value
