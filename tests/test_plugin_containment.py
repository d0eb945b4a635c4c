"""A bad plugin is contained: throwaway plugin distributions installed into a temporary path
(a ``*.dist-info`` with an entry point + a module, on ``PYTHONPATH`` of a subprocess), one that
fails to import and one that registers a built-in's name again; ``mukv plugins``, ``mukv demo``
and a Python session still work. Also: misspelled hooks, hooks that raise, two third-party
packages with one name."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mukv
import mukv.registry as reg_mod
from mukv.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def install(site: Path, dist: str, version: str, module: str, source: str, entry: str | None = None) -> None:
    """A minimal installed distribution: its metadata, one ``mukv`` entry point, its module."""
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[mukv]\n{entry or module} = {module}\n")
    (site / f"{module}.py").write_text(source)


BROKEN = "import mukv\nimport a_module_nobody_installed  # fails at import\n"
DUPE = '''import mukv


@mukv.hookimpl
def mukv_register_scorers(register):
    register("dual", lambda blocks: blocks.keys.norm(dim=-1).mean(dim=1))  # mukv's own name again
    register("dupe_norm", lambda blocks: -blocks.keys.norm(dim=-1).mean(dim=1))
'''


def run(site: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("MUKV_PLUGINS", None)
    env["MUKV_CONFIG_FILE"] = ""  # no user file
    env["XDG_CONFIG_HOME"] = str(site / "no-config")
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=str(site))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site = tmp_path_factory.mktemp("site")
    install(site, "mukv-broken", "0.1", "mukv_broken_plugin", BROKEN, entry="broken")
    install(site, "mukv-dupe", "0.2", "mukv_dupe_plugin", DUPE, entry="dupe")
    return site


def test_plugins_lists_the_broken_and_the_duplicate_and_everything_else(site):
    proc = run(site, "-m", "mukv", "plugins")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "semi_hierarchical" in out and "dupe_norm" in out  # every other component, the dupe's other name too
    broken = next(line for line in out.splitlines() if line.startswith("broken"))
    assert "mukv-broken 0.1" in broken and "a_module_nobody_installed" in broken
    conflict = next(line for line in out.splitlines() if line.startswith("conflict"))
    assert "'dual'" in conflict and "mukv 0.1.0" in conflict and "mukv-dupe 0.2" in conflict
    # reported once each on stderr, as warnings
    assert proc.stderr.count("a_module_nobody_installed") == 1 and proc.stderr.count("'dual'") == 1
    rows = json.loads(run(site, "-m", "mukv", "plugins", "--json").stdout)
    by_status = {r["status"] for r in rows}
    assert by_status == {"ok", "broken", "conflict"}
    dual = [r for r in rows if r["name"] == "dual"]
    assert {(r["package"], r["status"]) for r in dual} == {("mukv 0.1.0", "ok"), ("mukv-dupe 0.2", "conflict")}
    broken_row = next(r for r in rows if r["status"] == "broken")
    assert broken_row["plugin"] == "broken" and "ModuleNotFoundError" in broken_row["error"]


@contextlib.contextmanager
def on_path(site: Path, *modules: str):
    """Distributions of ``site`` on this process's path (as an installed package would be),
    with the registry rebuilt from them; all of it undone afterwards."""
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    reg_mod.reset()
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        for name in modules:
            sys.modules.pop(name, None)
        importlib.invalidate_caches()
        reg_mod.reset()


@pytest.fixture
def installed(site):
    with on_path(site, "mukv_dupe_plugin", "mukv_broken_plugin"):
        yield site


def test_demo_still_runs(installed, capsys):
    from mukv.cli import main

    assert main(["demo", "--minutes", "1", "--questions", "1", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "summary" in out and "answers" in out
    assert "plugin 'broken' (package mukv-broken 0.1) is skipped" in err  # reported, and the demo ran
    assert {p.plugin for p in mukv.get_registry().problems} == {"broken", "dupe"}


def test_a_python_session_still_works_and_the_builtin_keeps_its_name(installed):
    import numpy as np

    frames = np.random.default_rng(0).integers(0, 255, (8, 64, 64, 3), dtype=np.uint8)
    reg = mukv.get_registry()
    assert reg.entries["scorers"]["dual"].package.startswith("mukv "), reg.entries["scorers"]["dual"]
    model = None
    for scorer in ("dual", "dupe_norm"):
        with mukv.Session(model=model or "tiny-llava-ov", config={"scoring": {"scorer": scorer}}) as s:
            model = s.model
            s.feed(frames)
            assert s.ask("what color?", max_new_tokens=1).blocks
    assert reg.entries["scorers"]["dupe_norm"].package == "mukv-dupe 0.2"
    assert sorted(p.plugin for p in reg.problems) == ["broken", "dupe"]


def test_two_third_party_packages_with_one_name(tmp_path, capsys):
    from mukv.cli import main

    site = tmp_path / "site"
    other = DUPE.replace('register("dual", lambda blocks: blocks.keys.norm(dim=-1).mean(dim=1))  # mukv\'s own name again\n', "")
    install(site, "mukv-dupe", "0.2", "mukv_dupe_plugin", DUPE, entry="dupe")
    install(site, "mukv-other", "1.0", "mukv_other_plugin", other, entry="other")
    with on_path(site, "mukv_dupe_plugin", "mukv_other_plugin"):
        with pytest.raises(ConfigError) as err:
            mukv.Session(model="tiny-llava-ov", config={"scoring": {"scorer": "dupe_norm"}})
        msg = str(err.value)
        assert "'dupe_norm'" in msg and "mukv-dupe 0.2" in msg and "mukv-other 1.0" in msg and "scoring.scorer" in msg
        with mukv.Session(model="tiny-llava-ov") as s:  # every other name works
            assert s.config.scoring.scorer == "dual"
        assert main(["config", "show", "--config", '{"scoring": {"scorer": "dupe_norm"}}']) == 2
        err = capsys.readouterr().err
        assert "mukv: error:" in err and "mukv-other 1.0" in err and "Traceback" not in err


def test_a_misspelled_hook_names_the_closest_one(tmp_path, capsys):
    from mukv.cli import main

    site = tmp_path / "site"
    install(site, "mukv-typo", "0.1", "mukv_typo_plugin",
            "import mukv\n\n@mukv.hookimpl\ndef mukv_register_scorer(register):\n    register('x', lambda b: b)\n",
            entry="typo")
    with on_path(site, "mukv_typo_plugin"):
        assert main(["plugins", "--json"]) == 0
        row = next(r for r in json.loads(capsys.readouterr().out) if r["plugin"] == "typo")
    assert row["status"] == "broken" and row["package"] == "mukv-typo 0.1"
    assert "mukv_register_scorer()" in row["error"] and "did you mean mukv_register_scorers?" in row["error"]


class _Typo:
    def mukv_register_retriever(self, register):  # not decorated, misspelled: still an error
        register("x", object)


class _Raises:
    @mukv.hookimpl
    def mukv_register_scorers(self, register):
        register("fine_scorer", lambda blocks: blocks.keys.sum(-1).mean(1))

    @mukv.hookimpl
    def mukv_register_retrievers(self, register):
        raise RuntimeError("no retriever today")


def test_runtime_plugins_are_checked_when_registered():
    with pytest.raises(ConfigError, match="mukv_register_retriever.*did you mean mukv_register_retrievers"):
        mukv.register_plugin(_Typo())
    with pytest.raises(ConfigError, match="mukv_register_retrievers failed: RuntimeError: no retriever today"):
        mukv.register_plugin(_Raises())
    reg = mukv.get_registry()
    assert "fine_scorer" not in reg.entries["scorers"]  # a plugin that fails is skipped whole
    assert not any(isinstance(p, (_Typo, _Raises)) for p in reg_mod.plugin_manager().get_plugins())
    assert not reg.problems


def test_a_hook_that_raises_in_an_entry_point_skips_that_plugin_only(tmp_path):
    site = tmp_path / "site"
    src = ("import mukv\n\n@mukv.hookimpl\ndef mukv_register_scorers(register):\n"
           "    register('half_scorer', lambda b: b.keys.sum(-1).mean(1))\n\n"
           "@mukv.hookimpl\ndef mukv_register_retrievers(register):\n    raise RuntimeError('boom')\n")
    install(site, "mukv-raises", "0.3", "mukv_raises_plugin", src, entry="raises")
    with on_path(site, "mukv_raises_plugin"):
        reg = mukv.get_registry()
        assert "half_scorer" not in reg.entries["scorers"]  # skipped whole, its scorer too
        assert "semi_hierarchical" in reg.entries["retrievers"]
        (problem,) = reg.problems
        assert problem.status == "broken" and problem.package == "mukv-raises 0.3"
        assert "mukv_register_retrievers failed: RuntimeError: boom" in problem.error
