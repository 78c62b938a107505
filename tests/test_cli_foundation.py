"""The CLI as a user runs it (`python -m vlkit ...` in a subprocess): version, help, inject, plugins, errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

import vlkit


def run_cli(*args: str, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, COLUMNS="200", OMP_NUM_THREADS="1")
    full_env.pop("VLKIT_DEBUG", None)
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "vlkit", *args], capture_output=True, text=True, env=full_env,
                          cwd=cwd, timeout=120)


def test_version():
    r = run_cli("--version")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"vlkit {vlkit.__version__}"


def test_help_is_fast_and_does_not_import_torch():
    start = time.perf_counter()
    r = run_cli("--help")
    elapsed = time.perf_counter() - start
    assert r.returncode == 0, r.stderr
    assert "inject" in r.stdout and "plugins" in r.stdout
    assert elapsed < 3, f"vlkit --help took {elapsed:.2f}s"

    for args in (["--help"], ["inject", "--help"]):
        r = subprocess.run([sys.executable, "-X", "importtime", "-m", "vlkit", *args], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0
        imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
        assert "torch" not in imported, f"vlkit {' '.join(args)} imports torch"
    code = "import sys; from vlkit.cli.app import build_app; build_app(); print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_inject_writes_adapter_and_prints_table(tmp_path):
    out = tmp_path / "adapter"
    r = run_cli("inject", "--backbone", "tiny@random", "--adapter", "bottleneck", "--reduction", "8", "--towers",
                "both", "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert "parameters — tiny@random" in r.stderr and "tower: vision" in r.stderr and "tower: text" in r.stderr
    assert "trainable" in r.stderr and f"wrote adapter default (bottleneck, 16 sites) to {out}" in r.stderr
    result = json.loads(r.stdout)
    assert result["backbone"] == "tiny@random" and result["variant"] == "bottleneck" and not result["dry_run"]
    assert result["config"]["reduction"] == 8 and result["config"]["towers"] == "both"
    assert len(result["targets"]) == 16 and result["path"] == str(out)
    assert 0 < result["parameters"]["trainable_percent"] < 5
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["variant"] == "bottleneck" and cfg["targets"] == result["targets"]
    # what the CLI wrote loads through the Python API
    bb = vlkit.load_backbone("tiny@random")
    rec = vlkit.load_adapter(bb, out)
    assert rec.targets == result["targets"]


def test_inject_dry_run_writes_nothing(tmp_path):
    out = tmp_path / "never"
    r = run_cli("inject", "--backbone", "tiny@random", "--adapter", "lora", "--rank", "4", "--layers", "0,-1",
                "-O", "modules=qv", "-o", str(out), "--dry-run", "--json")
    assert r.returncode == 0, r.stderr
    assert not out.exists()
    assert not list(tmp_path.iterdir())
    expected = [f"{p}.{i}.attn#{x}" for p in ("visual.transformer.resblocks", "transformer.resblocks")
                for i in (0, 3) for x in "qv"]
    result = json.loads(r.stdout)
    assert result["dry_run"] and "path" not in result
    assert result["targets"] == expected and result["config"]["rank"] == 4
    for path in expected:
        assert path in r.stderr  # the table of targeted modules
    assert "wrote" not in r.stderr


BAD_INPUTS = {
    "unknown variant": (["--adapter", "no_such_variant"], "unknown adapter 'no_such_variant'"),
    "unknown backbone": (["--backbone", "no_such_backbone"], "unknown backbone 'no_such_backbone'"),
    "bad reduction": (["--reduction", "0"], "reduction must be > 0"),
    "unknown option for variant": (["--adapter", "lora", "--reduction", "8"], "reduction"),
    "bad option syntax": (["-O", "novalue"], "key=value"),
    "bad towers": (["--towers", "both-ish"], "towers"),
    "unknown flag": (["--no-such-flag"], "no-such-flag"),
    "bad number": (["--reduction", "abc"], "--reduction"),
}


@pytest.mark.parametrize("what", list(BAD_INPUTS))
def test_bad_inputs_exit_2_with_one_error_line(what, tmp_path):
    args, needle = BAD_INPUTS[what]
    base = {"--backbone": "tiny@random", "--adapter": "bottleneck", "-o": str(tmp_path / "out")}
    argv = ["inject"]
    for k, v in base.items():
        if k not in args:
            argv += [k, v]
    r = run_cli(*argv, *args)
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and needle in lines[0]
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "out").exists()


def test_missing_output_dir_is_an_error():
    r = run_cli("inject", "--backbone", "tiny@random")
    assert r.returncode == 2
    assert r.stderr.splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: ") and "-o/--out" in r.stderr


def test_debug_shows_traceback(tmp_path):
    r = run_cli("inject", "--backbone", "tiny@random", "--adapter", "no_such_variant", "-o", str(tmp_path / "o"),
                env={"VLKIT_DEBUG": "1"})
    assert r.returncode == 2
    assert "Traceback (most recent call last)" in r.stderr and "UnknownNameError" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: unknown adapter")


def test_plugins_json_lists_builtins():
    r = run_cli("plugins", "--json")
    assert r.returncode == 0, r.stderr
    infos = {i["name"]: i for i in json.loads(r.stdout)}
    adapters = infos["vlkit.adapters.builtin"]
    assert adapters["builtin"] and adapters["version"] == vlkit.__version__
    assert {"bottleneck", "lora"} <= set(adapters["registers"]["adapter"])
    assert {"open_clip", "hf"} <= set(infos["vlkit.backbones.builtin"]["registers"]["backbone"])
    assert infos["vlkit.world.plugin"]["builtin"] and infos["vlkit.world.plugin"]["registers"]["backbone"] == ["tiny", "tiny-vl"]
    assert {"synth-attribute-swap", "synth-relation-swap"} <= set(infos["vlkit.world.plugin"]["registers"]["probe"])
    assert infos["vlkit.cli.builtin"]["builtin"]
    names = list(infos)
    builtin_flags = [infos[n]["builtin"] for n in names]
    assert builtin_flags == sorted(builtin_flags, reverse=True), "built-ins come first"


# --- the error boundary, in process -------------------------------------------------------------------------------

def test_error_messages_are_one_line():
    from vlkit.cli.app import error_message, exit_code
    from vlkit.errors import BackboneLoadError, ConfigError

    msg = error_message(BackboneLoadError("checkpoint x does not fit:\n\tsize mismatch for a\n\tsize mismatch for b",
                                          hint="check the model"))
    assert msg == "error: checkpoint x does not fit: size mismatch for a size mismatch for b (check the model)"
    assert error_message(RuntimeError("boom\nagain")).startswith("error: unexpected RuntimeError: boom again")
    assert exit_code(ConfigError("x")) == 2 and exit_code(RuntimeError()) == 1 and exit_code(KeyboardInterrupt()) == 130


def test_plugin_command_exit_codes(reset_plugins, capsys):
    """A command added through register_commands keeps its exit code; usage errors are one `error:` line."""
    import typer

    from vlkit.cli.app import main
    from vlkit.hookspecs import hookimpl
    from vlkit.plugins import get_plugins

    class Commands:
        @hookimpl
        def register_commands(self, cli):
            @cli.command("boom")
            def boom(code: int = typer.Option(3, "--code")) -> None:
                raise typer.Exit(code)

    get_plugins().register_plugin(Commands(), name="test-commands")
    for argv, code in ((["boom"], 3), (["boom", "--code", "0"], 0)):
        with pytest.raises(SystemExit) as exc:
            main(argv)
            raise SystemExit(0)
        assert (exc.value.code or 0) == code
    with pytest.raises(SystemExit) as exc:
        main(["boom", "--code", "x"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "--code" in err[0]
