"""The documentation is tested code.

* every file in docs/snippets/ runs (Python files as ``__main__``; shell files
  command by command through ``mukv.cli.main``), and is included in a page;
* a fenced Python or shell block in a page must be a snippet include, never
  inline code that no test runs;
* every hook of mukv/hookspecs.py is documented in the reference and has a
  runnable example that implements it;
* every public class is documented in the reference (``::: module.Class``);
* every ``mukv`` subcommand and option appears in the CLI reference;
* ``mkdocs build --strict`` succeeds.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

import mukv
import mukv.registry
from mukv import hookspecs

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SNIPPETS = DOCS / "snippets"
REFERENCE = DOCS / "reference"

#: Snippets that are shown but not run here, and why.
NOT_RUN = {
    "install.sh": "installs packages (CI runs the same pip install before the tests)",
    "install_keynorm.sh": "installs packages (CI installs examples/mukv-keynorm before the tests)",
    "train_tiny_eval.sh": "evaluates mukv-tiny for minutes; tests/test_train.py covers benchmarks/train_tiny.py",
    "serve.sh": "starts servers that run until stopped; tests/serve/test_serve_process.py runs `mukv serve` as a process",
    "serve_s3.sh": "needs an S3 bucket; tests/serve/test_serve_s3.py runs two servers over moto's S3 on loopback",
    "serve_load.sh": "benchmarks of minutes; tests/serve/test_serve_load.py runs benchmarks/serve_load.py briefly",
}
#: Environment for snippets: long tutorials read their stream length from MINUTES.
SNIPPET_ENV = {"MINUTES": "1"}


def _requirement_missing(name: str) -> str | None:
    """Why a snippet cannot run here (an optional piece is not installed), or None."""
    text = (SNIPPETS / name).read_text()
    if ("backend=\"lancedb\"" in text or "mukv ingest" in text or "Session.open" in text) and \
            "lancedb" not in mukv.get_registry().entries["backends"]:
        return "the lancedb backend is not registered"
    if "key_norm" in text:
        try:
            importlib.import_module("mukv_keynorm")
        except ImportError:
            return "the example plugin is not installed: pip install -e examples/mukv-keynorm"
    if "mukv bench" in text:
        try:
            importlib.import_module("mukv.bench.evaluate")
        except ImportError:
            return "the evaluation harness mukv.bench.evaluate is not available yet"
    if "import av" in text:
        try:
            importlib.import_module("av")
        except ImportError:
            return "PyAV is not installed"
    return None


def snippet_files() -> list[str]:
    return sorted(p.name for p in SNIPPETS.iterdir() if p.suffix in (".py", ".sh"))


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


# ------------------------------------------------------------------------------ running snippets
_ASSIGN = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)=\$\{\1:-([^}]*)\}")
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def run_shell_snippet(path: Path, env: dict[str, str]) -> None:
    """Run a shell snippet's ``mukv`` commands in this process.

    Understood: comments, ``NAME=${NAME:-default}`` lines, ``$NAME`` expansion,
    ``NAME=value`` prefixes on a command, and ``\\`` line continuations. Any
    other shell syntax fails the test, so snippets stay plain commands.
    """
    from mukv.cli import main

    variables = dict(env)
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = _ASSIGN.fullmatch(line)
        if m:
            variables[m.group(1)] = variables.get(m.group(1), m.group(2))
            continue
        expanded = _VAR.sub(lambda v: variables[v.group(1) or v.group(2)], line)
        words = shlex.split(expanded)
        prefix = {}
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            k, _, v = words.pop(0).partition("=")
            prefix[k] = v
        assert words and words[0] == "mukv", f"{path.name}: only mukv commands can be run here; got {line!r}"
        saved = {k: os.environ.get(k) for k in prefix}
        os.environ.update(prefix)
        mukv.registry.reset()
        try:
            rc = main(words[1:])
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            mukv.registry.reset()
        assert rc == 0, f"{path.name}: `{line}` exited with {rc}"


@pytest.mark.parametrize("name", snippet_files())
def test_snippet_runs(name, tmp_path, monkeypatch, capsys):
    if name in NOT_RUN:
        pytest.skip(f"not run: {NOT_RUN[name]}")
    missing = _requirement_missing(name)
    if missing:
        pytest.skip(f"{name}: {missing}")
    monkeypatch.chdir(tmp_path)
    for k, v in SNIPPET_ENV.items():
        monkeypatch.setenv(k, v)
    path = SNIPPETS / name
    try:
        if path.suffix == ".py":
            runpy.run_path(str(path), run_name="__main__")
        else:
            run_shell_snippet(path, SNIPPET_ENV)
    finally:
        mukv.registry.reset()  # forget plugins a snippet registered at runtime
    out = capsys.readouterr().out
    assert out.strip(), f"{name} printed nothing; a docs snippet should show its result"


# ------------------------------------------------------------------------------ pages and snippets
_INCLUDE = re.compile(r'--8<--\s+"([^"]+)"')
_FENCE = re.compile(r"^(```+|~~~+)\s*([\w+-]*)[^\n]*\n(.*?)^\1\s*$", re.M | re.S)
CODE_LANGUAGES = {"python", "py", "pycon", "bash", "sh", "shell", "console", "zsh"}


def test_every_snippet_is_included_in_a_page():
    included = {m for page in pages() for m in _INCLUDE.findall(page.read_text())}
    orphans = [name for name in snippet_files() if name not in included]
    assert not orphans, f"snippets that no page includes (add --8<-- \"NAME\" to a page): {orphans}"
    for target in included:
        if not any((base / target).exists() for base in (SNIPPETS, ROOT / "examples")):
            pytest.fail(f"a page includes {target!r}, which exists neither in docs/snippets nor in examples/")


def test_code_blocks_are_snippet_files():
    inline = []
    for page in pages():
        for m in _FENCE.finditer(page.read_text()):
            lang, body = m.group(2).lower(), m.group(3).strip()
            if lang in CODE_LANGUAGES and not all(_INCLUDE.fullmatch(line.strip()) for line in body.splitlines()):
                inline.append(f"{page.relative_to(DOCS)}: {body.splitlines()[0][:60]!r}")
    assert not inline, ("code blocks must include a tested file from docs/snippets "
                        "(```python\\n--8<-- \"name.py\"\\n```), not inline code:\n  " + "\n  ".join(inline))


# ------------------------------------------------------------------------------ hooks and classes
HOOKS = sorted(name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("mukv_"))


@pytest.mark.parametrize("hook", HOOKS)
def test_hook_is_documented_and_has_a_tested_example(hook):
    text = (REFERENCE / "hooks.md").read_text()
    assert f"::: mukv.hookspecs.{hook}" in text, f"docs/reference/hooks.md does not document {hook}"
    examples = [p.name for p in SNIPPETS.glob("*.py") if f"def {hook}(" in p.read_text()]
    examples += [str(p.relative_to(ROOT)) for p in (ROOT / "examples").rglob("*.py") if f"def {hook}(" in p.read_text()]
    assert examples, f"no docs snippet implements {hook}: add one to docs/snippets (test_snippet_runs runs it)"
    included = {m for page in pages() for m in _INCLUDE.findall(page.read_text())}
    assert any(Path(e).name in {Path(i).name for i in included} for e in examples), \
        f"the examples of {hook} ({examples}) are not shown on any page"


#: Modules whose public classes (and functions, for mukv.plots) the reference must document.
PUBLIC_MODULES = ["mukv.session", "mukv.config", "mukv.blocks", "mukv.interfaces", "mukv.registry", "mukv.errors",
                  "mukv.plots", "mukv.specs", "mukv.settings", "mukv.logs", "mukv.log", "mukv.streams", "mukv.state",
                  "mukv.stream", "mukv.ingest", "mukv.window", "mukv.accel"]
#: Public classes of modules whose other classes are implementation details.
PUBLIC_NAMES = ["mukv.model.HFVideoLLM", "mukv.kvcache.PrefixKV"]


def public_objects() -> list[str]:
    names: set[str] = set(PUBLIC_NAMES)
    for modname in PUBLIC_MODULES:
        mod = importlib.import_module(modname)
        for name, obj in vars(mod).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != modname:
                continue
            if inspect.isclass(obj) or (modname == "mukv.plots" and inspect.isfunction(obj) and name in mod.__all__):
                names.add(f"{modname}.{name}")
    for name in mukv.__all__:  # the package's own API, by its defining module
        obj = getattr(mukv, name)
        if inspect.isclass(obj):
            names.add(f"{obj.__module__}.{obj.__qualname__}")
    bench = importlib.import_module("mukv.bench")
    for name in bench.__all__:
        obj = getattr(bench, name)
        if inspect.isclass(obj) or inspect.isfunction(obj):
            names.add(f"mukv.bench.{name}")
    # every component class the built-in plugins register
    for entry in mukv.get_registry().table():
        obj = entry.component
        if inspect.isclass(obj) and obj.__module__.startswith(("mukv.plugins", "mukv.backends")):
            names.add(f"{obj.__module__}.{obj.__qualname__}")
    return sorted(names)


def test_every_public_class_is_in_the_reference():
    text = "\n".join(p.read_text() for p in REFERENCE.glob("*.md"))
    documented = set(re.findall(r"^::: ([\w.]+)", text, re.M))
    missing = [n for n in public_objects() if n not in documented]
    assert not missing, ("public classes missing from docs/reference (add a `::: module.Name` line to the page "
                         "of its kind):\n  " + "\n  ".join(missing))


def test_reference_directives_resolve():
    text = "\n".join(p.read_text() for p in REFERENCE.glob("*.md"))
    for target in re.findall(r"^::: ([\w.]+)", text, re.M):
        module, _, attr = target.rpartition(".")
        try:
            mod = importlib.import_module(target)
            continue
        except ImportError:
            pass
        mod = importlib.import_module(module)
        assert hasattr(mod, attr), f"reference names {target}, which does not exist"


# ------------------------------------------------------------------------------ CLI reference
def _options(parser: argparse.ArgumentParser, prefix: str = "") -> list[tuple[str, str]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.append((prefix + name, ""))
                out += _options(sub, prefix + name + " ")
        else:
            for opt in action.option_strings:
                if opt.startswith("--") and opt not in ("--help",):
                    out.append((prefix.strip(), opt))
    return out


def test_cli_reference_names_every_command_and_option():
    from mukv.cli import build_parser

    text = (REFERENCE / "cli.md").read_text()
    missing = []
    for command, option in _options(build_parser()):
        if option:
            if f"`{option}" not in text:
                missing.append(f"mukv {command} {option}")
        elif f"mukv {command}" not in text:
            missing.append(f"mukv {command}")
    assert not missing, "docs/reference/cli.md does not mention:\n  " + "\n  ".join(missing)


# ------------------------------------------------------------------------------ the site
def test_mkdocs_build_strict(tmp_path):
    try:
        import mkdocs  # noqa: F401
        import mkdocstrings  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("CI must build the docs: install mkdocs with pip install -e '.[docs]'")
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "--site-dir",
                           str(tmp_path / "site")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "site" / "reference" / "hooks" / "index.html").exists()
