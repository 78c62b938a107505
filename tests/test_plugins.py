"""The plugin system: hooks, registries, name clashes, VLKIT_PLUGINS, and built-ins going through the same hooks."""
from __future__ import annotations

import re

import importlib.metadata as md
import sys
import types

import pytest

from vlkit import plugins
from vlkit.errors import PluginError, UnknownNameError
from vlkit.hookspecs import hookimpl
from vlkit.registry import Registry


class AdapterPlugin:
    """A small in-test plugin that registers adapter variants under the given names."""

    def __init__(self, *names):
        self.names = names

    @hookimpl
    def register_adapters(self, register):
        for n in self.names:
            register(n, object(), f"test variant {n}")


def test_no_misspelled_hooks():
    system = plugins.get_plugins()
    system.pm.check_pending()  # raises PluginValidationError for a hookimpl without a matching hookspec
    assert system.builtin <= {name for name, _ in system.pm.list_name_plugin()}


def test_misspelled_hook_is_caught(reset_plugins):
    from pluggy import PluginValidationError

    class Typo:
        @hookimpl
        def register_adapter(self, register):  # missing the final "s"
            pass

    system = plugins.get_plugins()
    system.register_plugin(Typo(), name="typo")
    with pytest.raises(PluginValidationError):
        system.pm.check_pending()


def test_builtins_registered_through_the_hooks():
    system = plugins.get_plugins()
    assert {"vlkit.backbones.builtin", "vlkit.adapters.builtin", "vlkit.cli.builtin"} <= system.builtin
    for kind, name, plugin in [("adapter", "bottleneck", "vlkit.adapters.builtin"),
                               ("adapter", "lora", "vlkit.adapters.builtin"),
                               ("backbone", "tiny", "vlkit.world.plugin"),
                               ("dataset", "world", "vlkit.world.plugin"),
                               ("backbone", "open_clip", "vlkit.backbones.builtin"),
                               ("backbone", "hf", "vlkit.backbones.builtin")]:
        entry = plugins.registry(kind).entry(name)
        assert entry.plugin == plugin and entry.kind == kind and entry.summary
        impls = getattr(system.pm.hook, plugins.HOOK_OF_KIND[kind]).get_hookimpls()
        assert plugin in {i.plugin_name for i in impls}
    infos = {i.name: i for i in system.plugin_infos()}
    assert infos["vlkit.adapters.builtin"].builtin
    assert {"bottleneck", "lora"} <= set(infos["vlkit.adapters.builtin"].registers["adapter"])
    with pytest.raises(ValueError):
        system.registry("nonsense")


def test_in_process_plugin_adds_a_variant(reset_plugins):
    system = plugins.get_plugins()
    system.register_plugin(AdapterPlugin("extra_variant"), name="my-plugin", version="9.9")
    entry = plugins.registry("adapter").entry("extra_variant")
    assert entry.plugin == "my-plugin" and entry.summary == "test variant extra_variant"
    info = {i.name: i for i in system.plugin_infos()}["my-plugin"]
    assert info.version == "9.9" and not info.builtin and info.registers == {"adapter": ["extra_variant"]}
    plugins.reset_plugins()
    assert "extra_variant" not in plugins.registry("adapter")


def test_same_name_from_two_plugins(reset_plugins):
    system = plugins.get_plugins()
    system.register_plugin(AdapterPlugin("twin"), name="first-plugin")
    system.register_plugin(AdapterPlugin("twin"), name="second-plugin")
    with pytest.raises(PluginError) as exc:
        system.registry("adapter")
    msg = str(exc.value)
    assert "twin" in msg and "first-plugin" in msg and "second-plugin" in msg


def test_plugin_clashing_with_a_builtin(reset_plugins):
    system = plugins.get_plugins()
    system.register_plugin(AdapterPlugin("lora"), name="lora-clone")
    with pytest.raises(PluginError) as exc:
        system.registry("adapter")
    assert "vlkit.adapters.builtin" in str(exc.value) and "lora-clone" in str(exc.value)


def test_registry_unknown_name_lists_known():
    reg = Registry("adapter")
    reg.add("alpha", 1, "p")
    reg.add("beta", 2, "p")
    with pytest.raises(UnknownNameError) as exc:
        reg.get("gamma")
    assert "gamma" in str(exc.value) and "alpha, beta" in str(exc.value)
    assert exc.value.known == ["alpha", "beta"] and exc.value.name == "gamma"
    with pytest.raises(PluginError):
        reg.add("", 3, "p")
    assert reg.names() == ["alpha", "beta"] and len(reg) == 2 and "alpha" in reg
    with pytest.raises(UnknownNameError) as exc:
        plugins.registry("adapter").get("nope")
    assert "bottleneck" in str(exc.value) and "lora" in str(exc.value)
    with pytest.raises(UnknownNameError, match="none registered"):
        Registry("probe").get("x")


@pytest.mark.parametrize("raw,expected", [
    (None, None),
    ("", set()),
    ("ia3", {"ia3"}),
    (" ia3 , other,, ", {"ia3", "other"}),
])
def test_vlkit_plugins_parsing(raw, expected, monkeypatch):
    if raw is None:
        monkeypatch.delenv("VLKIT_PLUGINS", raising=False)
    else:
        monkeypatch.setenv("VLKIT_PLUGINS", raw)
    assert plugins.allowed_external() == expected


@pytest.fixture
def fake_entry_points(monkeypatch):
    """Two installed plugins seen through the entry-point group: `fakeplug` (fine) and `brokenplug`."""
    mod = types.ModuleType("vlkit_test_fakeplug")
    mod.register_adapters = hookimpl(lambda register: register("fake_variant", object(), "fake"))
    monkeypatch.setitem(sys.modules, "vlkit_test_fakeplug", mod)
    eps = [md.EntryPoint(name="fakeplug", value="vlkit_test_fakeplug", group=plugins.ENTRY_POINT_GROUP),
           md.EntryPoint(name="brokenplug", value="vlkit_test_no_such_module_xyz", group=plugins.ENTRY_POINT_GROUP)]
    monkeypatch.setattr(plugins.md, "entry_points", lambda group=None: [e for e in eps if e.group == group])


def test_vlkit_plugins_selects_entry_points(fake_entry_points, monkeypatch, reset_plugins):
    monkeypatch.setenv("VLKIT_PLUGINS", "fakeplug")
    system = plugins.PluginSystem()
    assert "fake_variant" in system.registry("adapter")
    assert system.registry("adapter").entry("fake_variant").plugin == "fakeplug"
    assert "bottleneck" in system.registry("adapter")  # built-ins always load

    monkeypatch.setenv("VLKIT_PLUGINS", "")
    system = plugins.PluginSystem()
    assert "fake_variant" not in system.registry("adapter")
    assert system.builtin <= {n for n, _ in system.pm.list_name_plugin()}

    monkeypatch.setenv("VLKIT_PLUGINS", "fakeplug,brokenplug")
    with pytest.raises(PluginError, match="brokenplug"):
        plugins.PluginSystem()
    monkeypatch.delenv("VLKIT_PLUGINS")
    with pytest.raises(PluginError, match="brokenplug"):
        plugins.PluginSystem()


def test_reset_plugins_rereads_environment(fake_entry_points, monkeypatch, reset_plugins):
    monkeypatch.setenv("VLKIT_PLUGINS", "")
    plugins.reset_plugins()
    assert "fake_variant" not in plugins.registry("adapter")
    monkeypatch.setenv("VLKIT_PLUGINS", "fakeplug")
    assert "fake_variant" not in plugins.registry("adapter")  # cached until reset
    plugins.reset_plugins()
    assert "fake_variant" in plugins.registry("adapter")


def test_vlkit_plugins_naming_an_uninstalled_plugin_warns(fake_entry_points, monkeypatch, reset_plugins):
    monkeypatch.setenv("VLKIT_PLUGINS", "fakeplug,nosuchplug")
    monkeypatch.delenv("VLKIT_PLUGINS_STRICT", raising=False)
    system = plugins.PluginSystem()
    assert len(system.warnings) == 1 and re.search(r"nosuchplug.*not installed.*fakeplug", system.warnings[0])
    assert "fake_variant" in system.registry("adapter")


def test_vlkit_plugins_strict_makes_it_an_error(fake_entry_points, monkeypatch, reset_plugins):
    monkeypatch.setenv("VLKIT_PLUGINS", "fakeplug,nosuchplug")
    monkeypatch.setenv("VLKIT_PLUGINS_STRICT", "1")
    with pytest.raises(PluginError, match=r"nosuchplug.*not installed.*fakeplug"):
        plugins.PluginSystem()
