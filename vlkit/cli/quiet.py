"""Third-party progress bars and logs off for the command line: vlkit draws its own progress, and an error is
one line, so transformers' weight-loading bar, hub and datasets bars and library warnings do not come first.

Set through the libraries' environment variables before they are imported (so processes started from the
CLI, e.g. under torchrun, inherit it) and through their functions where they already are (the CLI called
in-process). `VLKIT_DEBUG=1` leaves them all as they are, beside the traceback it shows.
"""

from __future__ import annotations

import logging
import os
import sys

ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' bars follow the hub's setting when it is imported
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_VERBOSITY": "error",
    "DATASETS_VERBOSITY": "error",
}
LOGGERS = ("transformers", "huggingface_hub", "datasets", "accelerate", "open_clip", "timm", "peft")


def quiet_third_party() -> None:
    """Silence the progress bars and sub-error logs of transformers, huggingface_hub, datasets and friends."""
    if os.environ.get("VLKIT_DEBUG", "") not in ("", "0"):
        return
    for key, value in ENV.items():
        os.environ.setdefault(key, value)
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    if "transformers" in sys.modules:
        from transformers.utils import logging as tf_logging

        tf_logging.set_verbosity_error()
        tf_logging.disable_progress_bar()
    if "huggingface_hub" in sys.modules:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    if "datasets" in sys.modules:
        import datasets

        if os.environ.get("VLKIT_DATA_PROGRESS", "") in ("", "0"):  # as vlkit.data.load_data
            datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()


def quiet_plugin_log() -> None:
    """The CLI prints the plugin system's warnings itself, one `warning:` line each: its log records (for library
    users, `vlkit.plugins`) are dropped here so that no warning shows twice."""
    log = logging.getLogger("vlkit.plugins")
    log.propagate = False
    if not any(isinstance(h, logging.NullHandler) for h in log.handlers):
        log.addHandler(logging.NullHandler())
