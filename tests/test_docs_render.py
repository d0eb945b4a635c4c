"""The API reference renders: every docstring of mukv (plugins and backends included) is parsed
as mkdocstrings parses it (Google style, mkdocs.yml's options, docs/_griffe's extensions), and
the sections come out as their text means: one Returns description however many lines it
takes, one Raises row per exception with a real exception name, Args rows named after real
parameters, and no raw reST table left. (docs/hardening.md's screenshots show the pages.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
griffe = pytest.importorskip("griffe", reason="the docs need mkdocstrings: pip install -e '.[docs]'")
yaml = pytest.importorskip("yaml")


def _mkdocs_options() -> dict:
    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("", lambda loader, suffix, node: None)  # !!python/name tags
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=Loader)
    plugin = next(p["mkdocstrings"] for p in config["plugins"] if isinstance(p, dict) and "mkdocstrings" in p)
    return plugin["handlers"]["python"]["options"]


def _objects():
    options = _mkdocs_options()
    extensions = griffe.load_extensions(*[str(ROOT / e) if e.startswith("docs/") else e
                                          for e in options["extensions"]])
    pkg = griffe.load("mukv", search_paths=[str(ROOT)], extensions=extensions)
    seen: set[int] = set()

    def walk(obj):
        if id(obj) in seen or obj.is_alias:
            return
        seen.add(id(obj))
        yield obj
        for member in obj.members.values():
            if not member.is_alias:
                yield from walk(member)

    return list(walk(pkg)), options["docstring_options"]


OBJECTS, DOC_OPTIONS = _objects()
EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Warning)$")
SECTION_WORDS = re.compile(r"(?m)^\s*(Args|Arguments|Parameters|Returns|Raises|Yields|Attributes):\s*$")


def _sections(obj):
    return obj.docstring.parse("google", **DOC_OPTIONS) if obj.docstring else []


def test_the_objects_are_found():
    paths = {o.path for o in OBJECTS}
    assert {"mukv.session.Session.ask", "mukv.interfaces.GranularityExtractor.split",
            "mukv.plugins.scorers.dual.DualScorer", "mukv.backends.disk.tiered.TieredBackend"} <= paths


def test_no_raw_rest_table_is_left():
    bad = [o.path for o in OBJECTS for s in _sections(o)
           if s.kind.value == "text" and re.search(r"(?m)^\s*={3,}(\s+={3,})+\s*$", s.value)]
    assert not bad, f"reST tables the docs would show as raw text: {bad}"
    table = next(s.value for s in _sections(next(o for o in OBJECTS if o.path == "mukv.interfaces"))
                 if s.kind.value == "text" and "|" in s.value)
    assert "| GranularityExtractor |" in table and "| --- |" in table


def test_every_raises_row_names_one_exception():
    bad = []
    for o in OBJECTS:
        for s in _sections(o):
            if s.kind.value == "raises":
                bad += [f"{o.path}: {str(i.annotation)!r}" for i in s.value if not EXCEPTION.match(str(i.annotation))
                        or re.search(r"\b[A-Z]\w*(Error|Exception):", i.description)]
    assert not bad, "Raises rows that are not one exception name (one exception per line, continuation " \
                    "lines indented):\n  " + "\n  ".join(bad)


def test_every_returns_section_is_one_item():
    bad = [o.path for o in OBJECTS for s in _sections(o) if s.kind.value == "returns" and len(s.value) != 1]
    assert not bad, f"Returns sections split into several rows: {bad}"
    ask = next(o for o in OBJECTS if o.path == "mukv.session.Session.ask")
    (ret,) = next(s.value for s in _sections(ask) if s.kind.value == "returns")
    assert "span, score" in ret.description  # the second line belongs to the same description


def test_every_args_row_is_a_parameter():
    bad = []
    for o in OBJECTS:
        params = None
        if o.is_function:
            params = {p.name for p in o.parameters}
        elif o.is_class:
            init = o.members.get("__init__")
            params = {p.name for p in init.parameters} if init is not None and init.is_function else None
        for s in _sections(o):
            if s.kind.value != "parameters":
                continue
            for item in s.value:
                names = [n.strip() for n in item.name.split(",")]
                if not all(re.fullmatch(r"\*{0,2}[A-Za-z_]\w*", n) for n in names):
                    bad.append(f"{o.path}: {item.name!r}")
                elif params is not None and not any(p in params or "kwargs" in params or "options" in params
                                                    for p in names) and not o.is_class:
                    bad.append(f"{o.path}: {item.name!r} is not a parameter")
    assert not bad, "Args rows that are not parameters (a wrapped line not indented?):\n  " + "\n  ".join(bad)


def test_no_section_heading_is_left_as_text():
    bad = [o.path for o in OBJECTS for s in _sections(o) if s.kind.value == "text" and SECTION_WORDS.search(s.value)]
    assert not bad, f"section headings the parser did not take (check their indentation): {bad}"


def _words(text: str) -> list[str]:
    return re.findall(r"[A-Za-z0-9_]+", text)


HEADINGS = {"Args", "Arguments", "Parameters", "Returns", "Raises", "Yields", "Attributes", "Examples", "Example",
            "Note", "Notes", "Warns", "Warning", "Other", "Receives", "Functions", "Classes", "Modules", "Methods",
            "Keyword"}


def _lost(docstring) -> list[str]:
    """Words of ``docstring`` that none of its parsed sections holds."""
    from collections import Counter

    parsed = []
    for s in docstring.parse("google", **DOC_OPTIONS):
        if s.kind.value in ("text", "admonition"):
            parsed += _words(str(s.value.description if hasattr(s.value, "description") else s.value))
            parsed += _words(str(getattr(s, "title", "") or ""))
        else:
            for item in s.value:
                for attr in ("name", "annotation", "description"):
                    parsed += _words(str(getattr(item, attr, "") or ""))
    return sorted(Counter(w for w in _words(docstring.value) if w not in HEADINGS) - Counter(parsed))


def test_the_lost_text_check_catches_a_wrapped_line_at_the_items_indentation():
    bad = griffe.Docstring("Do.\n\nArgs:\n    x: the first line\n    goes on here.\n    y: other.\n")
    assert _lost(bad) == ["goes", "here", "on"]


def test_no_text_is_lost_by_the_parser():
    """Every word of a docstring ends up somewhere in its parsed sections (a wrapped line that
    the parser cannot place would be dropped with a warning nobody reads)."""
    bad = [f"{o.path}: {_lost(o.docstring)[:8]}" for o in OBJECTS if o.docstring and _lost(o.docstring)]
    assert not bad, "docstring words the rendered reference would drop:\n  " + "\n  ".join(bad)
