"""A griffe extension for the docs: mount ``plugins/`` and ``backends/`` as ``mukv.plugins``
and ``mukv.backends``, the names they are installed under (``package-dir`` in
pyproject.toml), so the reference can document them statically by their import path."""

from __future__ import annotations

import re
from typing import Any

import griffe

MOUNTS = {"plugins": "plugins", "backends": "backends"}  # member of mukv -> top-level folder


class MountPlugins(griffe.Extension):
    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "mukv":
            return
        for member, folder in MOUNTS.items():
            if member in pkg.members:
                continue
            sub = loader.load(folder, try_relative_path=False)
            pkg.set_member(member, sub)
            sub.name = member


_ROLE = re.compile(r":(?:class|func|data|meth|mod|attr|exc|obj):`~?([^`<]+?)(?:\s*<[^>]+>)?`")


_PARAM = re.compile(r"^(\s*):param (\w+):\s*(.*)$")


def _params_to_google(text: str) -> str:
    """``:param name: text`` lines (Sphinx style, as in hookspecs.py) -> a Google ``Args:`` section."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        m = _PARAM.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent = m.group(1)
        out.append(f"{indent}Args:")
        while i < len(lines) and (m := _PARAM.match(lines[i])):
            out.append(f"{indent}    {m.group(2)}: {m.group(3)}")
            i += 1
            while i < len(lines) and lines[i].startswith(indent + " ") and not _PARAM.match(lines[i]):
                out.append(f"{indent}        {lines[i].strip()}")
                i += 1
    return "\n".join(out)


_RULE = re.compile(r"^(\s*)(=+)((?: +=+)+)\s*$")


def _simple_tables_to_markdown(text: str) -> str:
    """reST simple tables (columns under runs of ``=``; a header row between the first two
    rules) -> Markdown pipe tables. A cell's text is what lies under its run of ``=`` (the last
    column takes the rest of the line)."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        m = _RULE.match(lines[i])
        if not m:
            out.append(lines[i])
            i += 1
            continue
        indent = m.group(1)
        spans = [(s.start(), s.end()) for s in re.finditer(r"=+", lines[i])]
        rules = [i]
        j = i + 1
        while j < len(lines) and len(rules) < 3 and lines[j].strip():
            if _RULE.match(lines[j]):
                rules.append(j)
            j += 1
        if len(rules) < 3:  # not a complete table: leave it as it is
            out.append(lines[i])
            i += 1
            continue

        def cells(line: str) -> list[str]:
            row = []
            for k, (a, _) in enumerate(spans):
                b = spans[k + 1][0] if k + 1 < len(spans) else len(line)
                row.append(line[a:b].strip().replace("|", "\\|"))
            return row

        header = [cells(line) for line in lines[rules[0] + 1:rules[1]]]
        body = [cells(line) for line in lines[rules[1] + 1:rules[2]] if line.strip()]
        head = [" ".join(c[k] for c in header).strip() for k in range(len(spans))]
        out.append(f"{indent}| " + " | ".join(head) + " |")
        out.append(f"{indent}| " + " | ".join("---" for _ in spans) + " |")
        out.extend(f"{indent}| " + " | ".join(row) + " |" for row in body)
        i = rules[2] + 1
    return "\n".join(out)


class ReSTRoles(griffe.Extension):
    """Render the reST of mukv's docstrings as Markdown: ``:class:`X``` becomes
    ```X```, ``:param x:`` lines an ``Args:`` section, a simple table (``=====``
    rules) a Markdown table, and a paragraph ending in ``::`` (a literal block
    follows) ends in ``:``."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        doc = obj.docstring
        if doc is None or not doc.value:
            return
        value = _ROLE.sub(lambda m: f"`{m.group(1)}`", doc.value)
        value = re.sub(r"(\S)::\n", r"\1:\n", value)
        value = re.sub(r"(?m)^::\n", "\n", value)
        value = _simple_tables_to_markdown(value)
        doc.value = _params_to_google(value)
