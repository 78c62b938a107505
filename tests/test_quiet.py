"""One line where one is promised (issue 29): third-party progress bars and logs stay off the command line's
stderr (transformers' weight-loading bar before an error line), and a warning is printed once."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
from cli_helpers import cli

import vlkit


def run_cli(args, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith(("HF_HUB_", "TRANSFORMERS_", "DATASETS_"))}
    full.update(env)
    return subprocess.run([sys.executable, "-m", "vlkit", *args], capture_output=True, text=True, env=full,
                          timeout=300)


@pytest.fixture
def hf_bottleneck(make_backbone, tmp_path):
    bb = make_backbone("hf")
    vlkit.inject(bb, "bottleneck")
    return vlkit.save_adapter(bb, tmp_path / "bn")


def test_peft_export_error_is_one_line_without_the_loading_bar(hf_bottleneck, tmp_path, capsys):
    code, out, err = cli(["export", "--format", "peft", "-a", str(hf_bottleneck), "-o", str(tmp_path / "o")],
                         capsys)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "\r" not in err and err.startswith("error: ") and "bottleneck" in err, err
    assert not (tmp_path / "o").exists()


def test_a_fresh_process_prints_one_line_too(hf_bottleneck, tmp_path):
    res = run_cli(["export", "--format", "peft", "-a", str(hf_bottleneck), "-o", str(tmp_path / "o"), "--json"],
                  VLKIT_PLUGINS="")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and "Loading weights" not in res.stderr, res.stderr
    assert res.stderr.startswith("error: ") and "bottleneck" in res.stderr
    debug = run_cli(["export", "--format", "peft", "-a", str(hf_bottleneck), "-o", str(tmp_path / "o")],
                    VLKIT_PLUGINS="", VLKIT_DEBUG="1")  # VLKIT_DEBUG leaves the libraries as they are
    assert debug.returncode == 2 and "Loading weights" in debug.stderr and "Traceback" in debug.stderr


def test_unknown_vlkit_plugins_name_warns_once():
    res = run_cli(["plugins", "--json"], VLKIT_PLUGINS="nosuchplug_xyz")
    assert res.returncode == 0, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if "nosuchplug_xyz" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: VLKIT_PLUGINS names nosuchplug_xyz"), res.stderr
    strict = run_cli(["plugins"], VLKIT_PLUGINS="nosuchplug_xyz", VLKIT_PLUGINS_STRICT="1")
    assert strict.returncode == 2 and strict.stderr.count("\n") == 1 and "nosuchplug_xyz" in strict.stderr


def test_library_users_still_get_the_warning_as_a_log_record(monkeypatch, caplog, reset_plugins):
    import logging

    from vlkit.plugins import PluginSystem

    monkeypatch.setenv("VLKIT_PLUGINS", "nosuchplug_xyz")
    monkeypatch.delenv("VLKIT_PLUGINS_STRICT", raising=False)
    logging.getLogger("vlkit.plugins").propagate = True
    with caplog.at_level(logging.WARNING, logger="vlkit.plugins"):
        system = PluginSystem()
    assert len(system.warnings) == 1
    assert system.warnings[0] in [r.getMessage() for r in caplog.records if r.name == "vlkit.plugins"]
