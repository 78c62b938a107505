"""Runs the vlkit-ia3 plugin's own test suite (plugins/vlkit-ia3/tests) when the plugin is installed.

The plugin is a separate distribution found through the "vlkit" entry-point group; install it with
`pip install --no-deps -e plugins/vlkit-ia3`. Its tests run in a child pytest so they see a clean
plugin system and the plugin package's own pytest configuration.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import subprocess
import sys
from pathlib import Path

import pytest

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "plugins" / "vlkit-ia3"


def _installed() -> bool:
    try:
        md.distribution("vlkit-ia3")
    except md.PackageNotFoundError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _installed(),
    reason="vlkit-ia3 is not installed; run `pip install --no-deps -e plugins/vlkit-ia3` to test the plugin",
)


def test_plugin_test_suite_passes():
    assert (PLUGIN_DIR / "tests").is_dir(), f"{PLUGIN_DIR}/tests is missing"
    env = dict(os.environ)
    env.pop("VLKIT_PLUGINS", None)
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(PLUGIN_DIR),
         str(PLUGIN_DIR / "tests")],
        cwd=PLUGIN_DIR, env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, f"plugin tests failed (exit {res.returncode}):\n{res.stdout[-4000:]}\n{res.stderr[-2000:]}"
