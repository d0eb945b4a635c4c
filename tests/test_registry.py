"""The plugin registry: built-ins through entry points, runtime plugins, restriction, docs of hooks."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import mukv
from mukv import hookspecs
import mukv.registry as reg_mod
from mukv.errors import ConfigError, UnknownPluginError


def test_every_hook_has_a_contract_docstring():
    hooks = [name for name in dir(hookspecs) if name.startswith("mukv_register_")]
    assert set(hooks) == set(reg_mod.ROLES.values())
    for name in hooks:
        doc = inspect.getdoc(getattr(hookspecs, name))
        assert doc, f"hook {name} has no docstring"
        assert ":param register:" in doc, f"hook {name} does not document its argument"
        assert "Called once" in doc, f"hook {name} does not say when it is called"


def test_builtins_come_from_the_entry_point_group():
    reg = mukv.get_registry()
    for role, name in [("extractors", "patch_raster"), ("extractors", "patch_spatial"), ("extractors", "segment"),
                       ("scorers", "attention"), ("scorers", "frequency_fft"), ("scorers", "frequency_diff"),
                       ("scorers", "dual"), ("compressors", "topk"), ("retrievers", "semi_hierarchical"),
                       ("retrievers", "uniform"), ("retrievers", "recent"), ("retrievers", "all"),
                       ("backends", "memory"), ("models", "tiny-llava-ov"), ("policies", "rekv")]:
        entry = reg.entries[role][name]
        assert entry.package.startswith("mukv "), entry
    assert "semi_hierarchical" in reg.names("retrievers")


def test_unknown_name_lists_choices():
    with pytest.raises(UnknownPluginError) as err:
        mukv.get_registry().get("scorers", "nope", field="scoring.scorer")
    msg = str(err.value)
    assert "nope" in msg and "scoring.scorer" in msg and "frequency_fft" in msg


class _Dup:
    @mukv.hookimpl
    def mukv_register_scorers(self, register):
        register("attention", lambda blocks: blocks.keys.sum(-1).mean(1))


def test_a_runtime_plugin_taking_a_builtin_name_is_refused_and_the_builtin_kept():
    with pytest.raises(ConfigError, match="registered by plugin 'scorers'.*and plugin 'dup'"):
        mukv.register_plugin(_Dup(), name="dup")
    assert not any(isinstance(p, _Dup) for p in reg_mod.plugin_manager().get_plugins())
    reg = mukv.get_registry()
    assert reg.entries["scorers"]["attention"].plugin == "scorers" and not reg.problems


def test_what_is_not_a_plugin_is_refused_and_nothing_is_registered():
    before = list(reg_mod.plugin_manager().get_plugins())
    for bad in (None, 5, "scorers", b"x", 1.5):
        with pytest.raises(ConfigError, match="a plugin is a module or an object"):
            mukv.register_plugin(bad)
        with pytest.raises(ConfigError, match="a plugin is a module or an object"):
            mukv.unregister_plugin(bad)
    with pytest.raises(ConfigError, match="defines no @mukv.hookimpl"):
        mukv.register_plugin(object())

    class Policy:
        @mukv.hookimpl
        def mukv_register_policies(self, register):
            register("a_policy_of_this_test", {})

    for name in (5, "", "   "):
        with pytest.raises(ConfigError, match="name must be a non-empty string"):
            mukv.register_plugin(Policy(), name=name)
    assert list(reg_mod.plugin_manager().get_plugins()) == before
    mukv.unregister_plugin(Policy())  # never registered: nothing happens
    assert "a_policy_of_this_test" not in mukv.get_registry().entries["policies"]


def test_env_allow_list_restricts_loading():
    code = "import mukv; r = mukv.get_registry(); print(sorted(r.names('scorers')), sorted(r.names('retrievers')))"
    out = subprocess.run([sys.executable, "-c", code], env={"MUKV_PLUGINS": "scorers", "PATH": ""},
                         capture_output=True, text=True, check=True).stdout
    assert "frequency_fft" in out and "[]" in out  # scorers loaded, retrievers not


def test_plugins_command_lists_components_and_packages():
    out = subprocess.run([sys.executable, "-m", "mukv", "plugins"], capture_output=True, text=True, check=True).stdout
    assert "semi_hierarchical" in out and "retrievers" in out and "mukv 0.1.0" in out
