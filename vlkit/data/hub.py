"""Loading from the Hugging Face Hub: the user's token, offline mode, and hub failures turned into DataError.

Every hub failure (offline, DNS, gated, not found) becomes one DataError that names the dataset id, says what
went wrong and how to give a local copy instead; no stack trace reaches the user.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import DataError

_TRUE = {"1", "ON", "YES", "TRUE"}

LOCAL_HINT = (
    "to use a local copy instead, give a local path: an imagefolder directory (imagefolder:DIR), "
    "a JSONL/CSV manifest of image paths (manifest:FILE.jsonl) or parquet files (parquet:DIR)"
)


def hf_token() -> str | None:
    """The user's Hugging Face token: HF_TOKEN, else the one saved by `hf auth login` / `huggingface-cli login`."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if token:
        return token.strip() or None
    try:
        from huggingface_hub import get_token
    except ImportError:  # pragma: no cover - huggingface_hub comes with datasets
        return None
    try:
        return get_token()
    except Exception:  # a broken token file must not stop a local run
        return None


def env_offline() -> bool:
    """Whether HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE ask for offline mode right now."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in _TRUE:
            return True
    return False


@contextmanager
def honor_offline_env() -> Iterator[bool]:
    """Apply offline mode set in the environment after `datasets` was imported (its flags are read at import).

    Yields whether offline mode is on. The library flags are restored on exit.
    """
    import datasets.config as dcfg

    offline = env_offline()
    patched: list[tuple[Any, str, Any]] = []
    if offline:
        targets = [(dcfg, "HF_HUB_OFFLINE"), (dcfg, "HF_DATASETS_OFFLINE")]
        try:
            import huggingface_hub.constants as hcst

            targets.append((hcst, "HF_HUB_OFFLINE"))
        except ImportError:  # pragma: no cover
            pass
        for mod, name in targets:
            if hasattr(mod, name) and getattr(mod, name) is not True:
                patched.append((mod, name, getattr(mod, name)))
                setattr(mod, name, True)
    try:
        yield offline or bool(getattr(dcfg, "HF_HUB_OFFLINE", False))
    finally:
        for mod, name, old in patched:
            setattr(mod, name, old)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


def _is_unreachable(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {
        "ConnectionError",
        "OfflineModeIsEnabled",
        "Timeout",
        "TimeoutError",
        "ConnectTimeout",
        "LocalEntryNotFoundError",
        "ConnectError",
    }:
        return True
    text = str(exc)
    return any(
        s in text
        for s in (
            "Couldn't reach",
            "offline mode",
            "OfflineModeIsEnabled",
            "Name or service not known",
            "Failed to resolve",
            "Connection refused",
        )
    )


def _is_gated(exc: BaseException) -> bool:
    names = {cls.__name__ for cls in type(exc).__mro__}
    return "GatedRepoError" in names or "gated" in str(exc).lower()


def hub_error(
    dataset_id: str, exc: BaseException, *, offline: bool, token: str | None, local_hint: str = LOCAL_HINT
) -> DataError:
    """The DataError for a failed hub load of `dataset_id`."""
    if _is_gated(exc):
        how = (
            "the token in use was refused: accept the dataset's terms on its hub page with this account"
            if token
            else "no Hugging Face token was found: set HF_TOKEN or run `hf auth login`"
        )
        return DataError(
            f"Hugging Face dataset {dataset_id!r} is gated: accept its terms at "
            f"https://huggingface.co/datasets/{dataset_id} and authenticate; {how}",
            hint=local_hint,
        )
    if offline or _is_unreachable(exc):
        why = "offline mode is on: HF_HUB_OFFLINE is set" if offline else _short(exc)
        return DataError(
            f"cannot load Hugging Face dataset {dataset_id!r}: the Hugging Face Hub is unreachable ({why}) "
            f"and no cached copy was found",
            hint=local_hint,
        )
    names = {cls.__name__ for cls in type(exc).__mro__}
    if names & {"DatasetNotFoundError", "RepositoryNotFoundError", "DataFilesNotFoundError"}:
        auth = "" if token else "; if it is private, set HF_TOKEN or run `hf auth login`"
        return DataError(f"Hugging Face dataset {dataset_id!r} was not found on the hub{auth}", hint=local_hint)
    return DataError(f"cannot load Hugging Face dataset {dataset_id!r}: {_short(exc)}", hint=local_hint)


def hub_load(
    dataset_id: str,
    *,
    name: str | None = None,
    split: str | None = None,
    token: str | bool | None = None,
    local_hint: str = LOCAL_HINT,
    **kwargs: Any,
):
    """`datasets.load_dataset(dataset_id, name=name, split=split, token=token)` with errors as DataError.

    `token=None` uses the user's token (HF_TOKEN or the saved login), so gated datasets work once the user
    has accepted their terms.
    """
    import datasets

    if not dataset_id or not isinstance(dataset_id, str):
        raise DataError("a Hugging Face dataset id is needed, e.g. hf:user/name", hint=local_hint)
    if token is None:
        token = hf_token()
    with honor_offline_env() as offline:
        try:
            return datasets.load_dataset(dataset_id, name=name, split=split, token=token, **kwargs)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            raise hub_error(
                dataset_id, exc, offline=offline, token=token if isinstance(token, str) else None, local_hint=local_hint
            ) from exc
