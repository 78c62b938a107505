"""Request bodies (JSON or multipart) of `vlkit serve`, checked before anything reaches the engine.

Field names are the issue's: embed `{"adapter", "text" | "image"}`, classify `{"adapter", "image", "labels"?}`,
score `{"adapter", "image", "texts"}`, answer `{"adapter", "image", "question"}`. `image` is base64 PNG/JPEG
(a `data:image/...;base64,` prefix is allowed) in JSON, or a file part in multipart/form-data. Types are strict
(a number where a string belongs is refused) and unknown fields are refused, so a typo is an error, not a default.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import RequestError
from ..imagefile import ImageDecodeError
from ..imagefile import open_image as decode
from .guards import MAX_JSON_DEPTH, check_json, check_prompt

AUTO = "auto"
FROZEN = ("none", "backbone", "frozen")


NAME_PATTERN = r"^[A-Za-z0-9_-]+$"  # a served name (vlkit.backbones.state.NAME_RE)
ADAPTER_PATTERN = r"^[A-Za-z0-9_.-]+$"  # what a request names: also compositions named after their folder
PROMPT_PATTERN = r"^([^{}]|\{\{|\}\})*\{\}([^{}]|\{\{|\}\})*$"  # one {} (doubled braces are literal)
ADAPTER_FIELD = "adapter name, 'auto' (the router of a route composition) or none/null (the frozen backbone)"


def _exactly_one(*groups: str) -> dict[str, Any]:
    """The JSON schema of 'exactly one of these fields' (pydantic checks the same in `_one_of`)."""
    return {"oneOf": [{"required": [g]} for g in groups]}


def _one_of(data: Any, groups: tuple[str, ...], what: str) -> Any:
    if isinstance(data, dict) and sum(g in data for g in groups) != 1:
        raise ValueError(f"give exactly one of {what}")
    return data


def _whole(value: Any) -> Any:
    """A JSON number with no fraction (3.0) is the integer JSON Schema says it is; anything else as sent."""
    return int(value) if isinstance(value, float) and value.is_integer() and abs(value) < 2**53 else value


WholeInt = Annotated[int, BeforeValidator(_whole)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Body(_Strict):
    adapter: str | None = Field(None, min_length=1, max_length=256, pattern=ADAPTER_PATTERN, description=ADAPTER_FIELD)


class EmbedInput(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_exactly_one("text", "image"))
    adapter: str | None = Field(
        None,
        min_length=1,
        max_length=256,
        pattern=ADAPTER_PATTERN,
        description=ADAPTER_FIELD + " (default: the request's)",
    )
    text: str = Field(None, description="a text to embed (or give image)")  # type: ignore[assignment]
    image: str = Field(None, min_length=1, description="base64 PNG/JPEG image to embed (or give text)")  # type: ignore[assignment]

    @model_validator(mode="before")
    @classmethod
    def _one(cls, data):
        return _one_of(data, ("text", "image"), "`text` and `image`")


class EmbedBody(_Body):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_exactly_one("text", "image", "inputs"))
    text: str = Field(None, description="a text to embed (or give image or inputs)")  # type: ignore[assignment]
    image: str = Field(None, min_length=1, description="base64 PNG/JPEG image to embed")  # type: ignore[assignment]
    inputs: list[EmbedInput] = Field(
        None,  # type: ignore[arg-type]
        min_length=1,
        description="a list of texts and images, each with its own adapter or the "
        "request's (up to --max-inputs); answered as `results`",
    )

    @model_validator(mode="before")
    @classmethod
    def _one(cls, data):
        return _one_of(data, ("text", "image", "inputs"), "`text`, `image` and `inputs`")


class ClassifyInput(_Strict):
    adapter: str | None = Field(None, min_length=1, max_length=256, pattern=ADAPTER_PATTERN, description=ADAPTER_FIELD)
    image: str = Field(..., min_length=1, description="base64 PNG/JPEG image")


class ClassifyBody(_Body):
    model_config = ConfigDict(extra="forbid", strict=True, json_schema_extra=_exactly_one("image", "inputs"))
    image: str = Field(None, min_length=1, description="base64 PNG/JPEG image (or give inputs)")  # type: ignore[assignment]
    inputs: list[ClassifyInput] = Field(
        None,  # type: ignore[arg-type]
        min_length=1,
        description="images, each with its own adapter or the request's (up to --max-inputs); answered as `results`",
    )
    labels: list[str] = Field(
        None,  # type: ignore[arg-type]
        min_length=1,
        json_schema_extra={"uniqueItems": True},
        description="distinct class labels to score instead of the adapter's head",
    )
    prompt: str = Field(
        None,
        pattern=PROMPT_PATTERN,  # type: ignore[assignment]
        description="template with exactly one {} (the label) and no other field (default: the "
        "adapter's task prompt, else 'a photo of a {}')",
    )
    top: WholeInt = Field(3, ge=1, le=1000, description="entries in `top`")

    @model_validator(mode="before")
    @classmethod
    def _one(cls, data):
        return _one_of(data, ("image", "inputs"), "`image` and `inputs`")

    @field_validator("prompt")
    @classmethod
    def _one_field(cls, value):
        return check_prompt(value)

    @field_validator("labels")
    @classmethod
    def _distinct(cls, value):
        if value is not None and len(set(value)) != len(value):
            raise ValueError("give distinct labels")
        return value


class ScoreInput(_Strict):
    adapter: str | None = Field(None, min_length=1, max_length=256, pattern=ADAPTER_PATTERN, description=ADAPTER_FIELD)
    image: str = Field(..., min_length=1, description="base64 PNG/JPEG image")
    texts: list[str] = Field(..., min_length=1, description="texts scored against the image")


class ScoreBody(_Body):
    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "anyOf": [
                {"required": ["image", "texts"], "not": {"required": ["inputs"]}},
                {"required": ["inputs"], "not": {"anyOf": [{"required": ["image"]}, {"required": ["texts"]}]}},
            ]
        },
    )
    image: str = Field(None, min_length=1, description="base64 PNG/JPEG image (with texts, or give inputs)")  # type: ignore[assignment]
    texts: list[str] = Field(
        None,  # type: ignore[arg-type]
        min_length=1,
        description="texts scored against the image",
    )
    inputs: list[ScoreInput] = Field(
        None,  # type: ignore[arg-type]
        min_length=1,
        description="image-texts pairs, each with its own adapter or the request's (up "
        "to --max-inputs); answered as `results`",
    )

    @model_validator(mode="before")
    @classmethod
    def _one(cls, data):
        if isinstance(data, dict) and ("inputs" in data) == ("image" in data or "texts" in data):
            raise ValueError("give `image` with `texts`, or `inputs`")
        if isinstance(data, dict) and "inputs" not in data and not ("image" in data and "texts" in data):
            raise ValueError("give `image` with `texts`")
        return data


class AnswerBody(_Body):
    image: str = Field(..., min_length=1, description="base64 PNG/JPEG image")
    question: str = Field(..., description="the question")
    top: WholeInt = Field(3, ge=1, le=1000, description="entries in `scores` and `top`")


class LoadBody(_Strict):
    path: str = Field(
        ...,
        min_length=1,
        max_length=4096,
        pattern=r"^[^\x00]*\S[^\x00]*$",
        description="adapter directory on the server (an export directory for --engine onnx)",
    )


Body = TypeVar("Body", bound=BaseModel)

BODIES: dict[str, type[BaseModel]] = {
    "embed": EmbedBody,
    "classify": ClassifyBody,
    "score": ScoreBody,
    "answer": AnswerBody,
    "load": LoadBody,
}


def one_line(text: Any) -> str:
    return " ".join(str(text).split())


def validation_message(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err.get("loc", ())) or "body"
    msg = err.get("msg", "invalid")
    if err.get("type") == "extra_forbidden":
        msg = "unknown field"
    elif err.get("type") == "value_error":
        msg = msg.removeprefix("Value error, ")
    return one_line(f"field '{loc}': {msg}")


def parse_json(raw: bytes, model: type[Body]) -> Body:
    """The body as `model`: RequestError 400 for malformed JSON, 422 for a wrong shape, field or type."""
    try:
        data = json.loads(raw.decode("utf-8")) if raw else None
    except UnicodeDecodeError:
        raise RequestError("malformed JSON body: not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise RequestError(f"malformed JSON body: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise RequestError(f"malformed JSON body: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:  # an integer of more digits than Python converts (4300)
        raise RequestError("malformed JSON body: a number has too many digits") from None
    check_json(data)
    if not isinstance(data, dict):
        got = type(data).__name__ if data is not None else "nothing"
        raise RequestError(f"the body must be a JSON object, got {got}", status=422)
    return validate(data, model)


def validate(data: dict, model: type[Body]) -> Body:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestError(validation_message(exc), status=422) from None


def form_fields(form, model: type[Body]) -> tuple[Body, Any]:
    """A multipart form as `model` and its `image` file part (an UploadFile the caller reads; None without one)."""
    data: dict[str, Any] = {}
    image = None
    for key in set(form.keys()):
        values = form.getlist(key)
        field = model.model_fields.get(key)
        if key == "image":
            v = values[0]
            if hasattr(v, "read"):
                image = v  # UploadFile, read by the caller
                data["image"] = "(file part)"  # read by the caller
            else:
                data["image"] = v
            continue
        if field is not None and "list" in str(field.annotation):
            data[key] = [str(x) for x in values]
        elif field is not None and field.annotation is int:
            try:
                data[key] = int(values[0])
            except ValueError:
                raise RequestError(f"field '{key}': not an integer: {values[0]!r}", status=422) from None
        else:
            data[key] = values[0] if isinstance(values[0], str) else values[0]
    return validate(data, model), image


def decode_base64(text: str, field: str = "image") -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError(f"field '{field}' is not valid base64") from None


def open_image(raw: bytes, max_pixels: int):
    """Decode image bytes (base64, data URI or multipart) through `vlkit.imagefile.open_image`: the PIL image in
    its own mode, for the backbone's own transform. 400 for bytes that are no image, 413 over `max_pixels`."""

    if not raw:
        raise RequestError("the image is empty")
    try:
        return decode(raw, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        if exc.too_large:
            raise RequestError(f"{exc.message} (--max-pixels)", status=413) from None
        raise RequestError(f"the image bytes are {one_line(exc.message)[:160]}") from None


def adapter_of(value: str | None) -> str | None:
    """The adapter a request names: a name, 'auto', or None (the frozen backbone)."""
    if value is None:
        return None
    v = value.strip()
    if not v or v.lower() in FROZEN:
        return None
    return AUTO if v.lower() == AUTO else v
