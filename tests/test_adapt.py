"""`vlkit adapt`: few-shot selection, the retention table, and the adapter-off check."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from vlkit.errors import ConfigError
from vlkit.train.adapt import run_adapt
from vlkit.train.engine import few_shot


def test_few_shot_takes_k_per_class():
    from vlkit import world

    ds = world.generate("medical", "classification", 60, seed=0)
    sub = few_shot(ds, 3, seed=1)
    labels = sub["label"]
    assert len(sub) == 3 * len(world.class_names("medical"))
    assert all(labels.count(c) == 3 for c in set(labels))
    assert few_shot(ds, 3, seed=1)["label"] == labels
    with pytest.raises(ConfigError, match="not enough"):
        few_shot(ds, 50)


def test_adapt_table_and_retention(tmp_path):
    res = run_adapt("tiny@random", "medical", shots=2, out=tmp_path / "med", steps=4, n_eval=30,
                    baselines=("full", "linear"), progress=False)
    methods = [r["method"] for r in res["rows"]]
    assert methods[0].startswith("zero-shot") and "full fine-tuning" in methods and "linear probe (L-BFGS)" in methods
    off = next(r for r in res["rows"] if r["method"].endswith("off"))
    assert off["verified_unchanged"] is True and off["general_change"] == 0.0
    full = next(r for r in res["rows"] if r["method"] == "full fine-tuning")
    assert "forgetting" in full
    assert (tmp_path / "med" / "adapter_model.safetensors").is_file()


def test_adapt_cli_errors_and_json(tmp_path):
    r = subprocess.run([sys.executable, "-m", "vlkit", "adapt", "--backbone", "tiny@random", "--domain", "mars"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "mars" in r.stderr
    r = subprocess.run([sys.executable, "-m", "vlkit", "adapt", "--backbone", "tiny@random", "--domain", "sketch",
                        "--shots", "1", "--steps", "2", "-o", str(tmp_path / "sk"), "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-1500:]
    out = json.loads(r.stdout)
    assert out["domain"] == "sketch" and out["adapter_off_verified"] is True
