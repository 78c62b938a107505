"""`vlkit inject` generates its variant flags from the variant's config dataclass: `--adapter X --help` lists X's
own options with their help, any declared option is a flag, an undeclared one is refused naming the valid ones."""
from __future__ import annotations

import json

import pytest

from cli_helpers import cli
from vlkit.options import option_specs
from vlkit.plugins import registry


@pytest.mark.parametrize("variant", ["dora", "vera", "bottleneck"])
def test_adapter_help_lists_the_variants_own_options(variant, capsys):
    code, out, _ = cli(["inject", "--adapter", variant, "--help"], capsys)
    assert code == 0
    text = " ".join(out.split())
    for spec in option_specs(registry("adapter").get(variant).config_cls):
        assert f"--{spec.name.replace('_', '-')}" in text
        if spec.help:
            assert " ".join(spec.help.split())[:40] in text


def test_plain_help_does_not_list_a_variant(capsys):
    code, out, _ = cli(["inject", "--help"], capsys)
    assert code == 0 and "Options of adapter variant" not in out


def test_variant_flags_reach_the_config(tmp_path, capsys):
    code, out, err = cli(["inject", "-b", "tiny@random", "--adapter", "dora", "--rank", "3", "--towers", "text",
                          "--layers", "0,-1", "-o", str(tmp_path / "d"), "--json"], capsys)
    assert code == 0, err
    cfg = json.loads((tmp_path / "d" / "adapter_config.json").read_text())["config"]
    assert cfg["rank"] == 3 and cfg["towers"] == "text" and cfg["layers"] == [0, -1]
    assert json.loads(out)["config"]["rank"] == 3


@pytest.mark.parametrize("args,needle", [
    (["--rnk", "3"], "unknown option --rnk"),
    (["--rank", "three"], "--rank must be an integer"),
    (["--rank"], "--rank needs a value"),
])
def test_bad_variant_flags_exit_2_naming_the_flag(args, needle, tmp_path, capsys):
    code, _, err = cli(["inject", "-b", "tiny@random", "--adapter", "lora", *args, "--dry-run"], capsys)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
