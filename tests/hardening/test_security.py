"""Security properties (issue 7, part 4).

* Stream ids and level names cannot escape the store or reach a lancedb filter unvalidated.
* lancedb filters are built only from validated identifiers and integers: every filter string
  mukv sends during a whole session (hostile questions included) parses in a tiny grammar of
  quoted safe identifiers, integers, comparisons and AND / OR / NOT; and every call site that
  passes a filter is listed here, so a new one is reviewed.
* Plugin loading can be restricted with ``MUKV_PLUGINS``; an excluded plugin is not even imported.
* Checkpoints load through safetensors only: a pickle checkpoint is refused, and a pickle beside
  safetensors weights is never opened.
* A store opened read-only is not written: every write is refused with a clear error, and
  no file of the store changes (nor does :func:`verify_store` change any).
"""

from __future__ import annotations

import ast
import json
import os
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import mukv
from hardening_helpers import FAST, assert_clear_error, frames, tree_digest

ROOT = Path(__file__).resolve().parents[2]
HOSTILE_IDS = ["../escape", "a/b", "a\\b", "/abs", "..", ".", ".hidden", "x'; DROP TABLE blocks; --",
               "a' OR '1'='1", "sp ace", "", "a" * 129, "nul\x00", "new\nline", "ünïcode", "-rf", "a..b",
               "C:\\x", "~root", "%2e%2e", "a\u2215b", "\u202etxt.exe", "cam\n", "cam-1\n"]


# ------------------------------------------------------------------------------ names and paths
@settings(max_examples=300, deadline=None)
@given(sid=st.one_of(st.text(max_size=140), st.sampled_from(HOSTILE_IDS),
                     st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,20}", fullmatch=True)))
def test_stream_ids_cannot_escape_the_store(sid, tmp_path_factory):
    from mukv.backends.disk.files import check_stream_id
    from mukv.backends.disk.lance_index import where

    try:
        ok = check_stream_id(sid)
    except mukv.StoreError as exc:
        assert_clear_error(exc)
        with pytest.raises(mukv.StoreError):
            where(sid, "patch", 1)
        return
    assert ok == sid and re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", sid) and ".." not in sid
    root = Path("/store").resolve()
    for rel in (f"streams/{sid}.json", f"streams/{sid}.lock", f"kv/{sid}/patch.zarr"):
        p = (root / rel).resolve()
        assert p.is_relative_to(root) and p.parent.name in ("streams", sid), (sid, p)
    assert where(sid, "patch", 3) == f"stream_id = '{sid}' AND level = 'patch' AND block_id < 3"


@settings(max_examples=200, deadline=None)
@given(level=st.one_of(st.text(max_size=70), st.sampled_from(["patch' OR '1'='1", "a b", "1abc", "lvl;--", "patch\n"])))
def test_level_names_are_identifiers_everywhere(level):
    from mukv.backends.disk.files import check_level

    cfg_ok = lvl_ok = True
    try:
        mukv.LevelConfig(name=level, extractor="frame", keep_ratio=0.1, top_k=1)
    except Exception:  # pydantic's ValidationError (MukvConfig.build turns it into a ConfigError)
        cfg_ok = False
    try:
        check_level(level)
    except mukv.StoreError as exc:
        assert_clear_error(exc)
        lvl_ok = False
    if cfg_ok or lvl_ok:
        assert re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", level)


@pytest.mark.parametrize("sid", HOSTILE_IDS)
def test_hostile_stream_ids_through_the_session(sid, tiny_model, tmp_path):
    store = tmp_path / "store"
    for make in (lambda: mukv.Session(model=tiny_model, backend="lancedb", path=store, stream_id=sid),
                 lambda: mukv.Session.open(store, stream_id=sid, model=tiny_model),
                 # the memory backend keeps the one rule: its ids also name logs, exports, URLs and metrics
                 lambda: mukv.Session(model=tiny_model, backend="memory", stream_id=sid)):
        with pytest.raises(mukv.StoreError, match="invalid stream id") as err:
            make()
        assert_clear_error(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing created, inside or outside


# ------------------------------------------------------------------------------ lancedb filters
_ID = r"[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}"
_LV = r"[A-Za-z_][A-Za-z0-9_]{0,63}"
_INT = r"-?\d+"
FILTER_TOKENS = re.compile("|".join([
    rf"stream_id = '{_ID}'", rf"level = '{_LV}'",
    rf"(block_id|frame_start|frame_end) (<|<=|>=|>|=) {_INT}",
    rf"block_id IN \({_INT}(, {_INT})*\)",
    r"AND", r"OR", r"NOT", r"false", r"\(", r"\)", r"\s+",
]))


def filter_is_safe(clause: str) -> bool:
    """The whole string is a sequence of grammar tokens (and parentheses balance)."""
    pos, depth = 0, 0
    while pos < len(clause):
        m = FILTER_TOKENS.match(clause, pos)
        if m is None or m.end() == pos:
            return False
        depth += {"(": 1, ")": -1}.get(m.group(), 0)
        if depth < 0:
            return False
        pos = m.end()
    return depth == 0


def test_filter_grammar_rejects_pasted_text():
    assert filter_is_safe("stream_id = 'cam-1' AND level = 'patch' AND block_id < 10")
    assert filter_is_safe("stream_id = 's' AND NOT ((level = 'patch' AND block_id < 3))")
    for bad in ("stream_id = 'a' OR '1'='1'", "stream_id = 'x'; DROP TABLE blocks", "level = 'a b'",
                "stream_id = 'a' AND (block_id < 3", "question = 'what'", "stream_id = '../x'"):
        assert not filter_is_safe(bad), bad


def test_every_filter_sent_to_lancedb_is_built_from_validated_names(tiny_model, tmp_path, monkeypatch):
    """Record every filter a whole life of a store sends (feeding, hostile questions, both retrievers,
    frame-range scans, reopening with recovery, a reader, verify_store) and parse each one."""
    from lancedb import query as lq
    from lancedb.table import LanceTable

    from mukv.backends.disk import verify_store

    seen: list[str] = []

    def spy(cls, name, pos):
        real = getattr(cls, name)

        def wrapper(self, *args, **kwargs):
            value = args[pos] if len(args) > pos else kwargs.get("where", kwargs.get("filter"))
            if value is not None:
                seen.append(value if isinstance(value, str) else repr(value))
            return real(self, *args, **kwargs)

        monkeypatch.setattr(cls, name, wrapper)

    spy(lq.LanceQueryBuilder, "where", 0)
    spy(lq.LanceVectorQueryBuilder, "where", 0)
    spy(LanceTable, "count_rows", 0)
    spy(LanceTable, "delete", 0)
    path = tmp_path / "st"
    opts = {"hot_bytes": 64 << 10, "hot_slab_bytes": 32 << 10, "commit_interval": 0.0, "scan_frames": 2}
    questions = ["'; DROP TABLE blocks; --", "stream_id = 'x' OR '1'='1", "level = 'patch' OR 1=1", "\x00'\"",
                 "what color was the car?"]
    for retriever in ("semi_hierarchical", "hierarchical"):
        cfg = {**FAST, "retrieval": {"retriever": retriever}}
        s = mukv.Session(model=tiny_model, backend="lancedb", path=path, stream_id=f"cam-1.{retriever}",
                         config=cfg, backend_options=opts)
        s.feed(frames(8))
        for q in questions:
            s.ask(q)
        s.close()
        s = mukv.Session.open(path, stream_id=f"cam-1.{retriever}", model=tiny_model, backend_options=opts)
        s.feed(frames(2, seed=1))
        s.backend.flush()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = mukv.Session.open(path, stream_id=f"cam-1.{retriever}", model=tiny_model,
                                  backend_options={**opts, "read_only": True})
        r.ask(questions[0])
        r.close()
        s.close()
    assert verify_store(str(path)).ok
    assert len(seen) > 20
    bad = [c for c in seen if not filter_is_safe(c)]
    assert not bad, bad
    assert not any(q in c for q in questions for c in seen)


#: every place in the disk tier that hands lancedb a filter, with the expression it passes.
#: A new call site fails this test: check it builds its filter from check_stream_id / check_level / int only.
FILTER_CALL_SITES = {
    ("lance_index.py", "delete_uncounted", "count_rows", "clause"),
    ("lance_index.py", "delete_uncounted", "delete", "clause"),
    ("lance_index.py", "_holds", "count_rows", "where(sid, level, n)"),
    ("lance_index.py", "_maintain", "count_rows", ""),
    ("lance_index.py", "build_vector_index", "count_rows", ""),
    ("lance_index.py", "count", "count_rows", "clause"),
    ("lance_index.py", "levels", "where", "clause"),  # f"stream_id = '{check_stream_id(stream_id)}'"
    ("lance_index.py", "search", "where", "where(stream_id, level, below, within)"),
    ("lance_index.py", "scan", "where", "clause"),  # where(stream_id, level, None if after else below, within)
    ("lance_index.py", "fetch", "where", "clause"),
    ("lance_index.py", "rows", "where", "f\"stream_id = '{check_stream_id(stream_id)}'\""),
    ("lance_index.py", "beyond", "where", "clause"),  # _uncounted(stream_id, counts): check_stream_id, check_level, int
    # file deletions, not filters: object-store keys / paths under the stream's folder, names checked by _FILE_NAME
    ("files.py", "delete", "delete", "self._store"),
    ("persist.py", "_commit_run", "delete", "f'{self._stream_dir()}/{name}'"),
    ("recovery.py", "_remove_unreferenced_files", "delete", "f'{self._stream_dir()}/{name}'"),
    ("recovery.py", "_remove_unreferenced_files", "delete", "f'{thumbs}/{name}'"),
    ("repair.py", "apply_repair", "delete", "f\"streams/{rep.stream_id}/{check_stream_id(pend['file'])}\""),
    ("streams.py", "delete_stream", "delete", "rel"),  # f"streams/{check_stream_id(stream_id)}.json"
    ("streams.py", "remove_tree", "delete", "obj['path']"),  # listed under kv/<id>/ or streams/<id>/
    ("streams.py", "_discard", "delete", "f'streams/{did}.json'"),
}
#: what may be interpolated into an f-string of lance_index.py: validated names, ints, and clauses built of them
SAFE_INTERPOLATIONS = {"check_stream_id(stream_id)", "check_level(level)", "check_level(lv)", "int(below)",
                       "int(n)", "a", "b", "starts", "inside", "keep", "lo", "hi", "_stream_level(stream_id, level)",
                       "', '.join((str(int(i)) for i in ids))", "clause", "where", "what", "text", "hint",
                       "exc", "TABLE", "self.files.uri('index')", "files.uri('index')", "field.type.list_size",
                       "self.vector_dim",
                       "v", "fid", "stream_id", "level", "str(exc).split(', /', 1)[0]",
                       "seconds"}  # a timeout's float, in an error message


def test_filter_call_sites_are_the_reviewed_ones():
    sites, interpolated = set(), set()
    for file in sorted((ROOT / "backends" / "disk").glob("*.py")):
        tree = ast.parse(file.read_text())
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr in ("where", "count_rows", "delete")):
                    arg = ast.unparse(node.args[0]) if node.args else ""
                    sites.add((file.name, fn.name, node.func.attr, arg))
                if file.name == "lance_index.py" and isinstance(node, ast.FormattedValue):
                    interpolated.add(ast.unparse(node.value))
    assert sites == FILTER_CALL_SITES, sorted(sites ^ FILTER_CALL_SITES)
    assert interpolated <= SAFE_INTERPOLATIONS, sorted(interpolated - SAFE_INTERPOLATIONS)


# ------------------------------------------------------------------------------ plugins
PROBE = """
import json, sys
import mukv
from mukv.registry import registry
reg = registry()
out = {"backends": reg.names("backends"), "models": reg.names("models"),
       "disk_imported": "mukv.backends.disk" in sys.modules}
try:
    mukv.Session(backend="lancedb", path="/nonexistent")
except mukv.MukvError as exc:
    out["error"] = [type(exc).__name__, str(exc)]
out["disk_imported_after"] = "mukv.backends.disk" in sys.modules
print(json.dumps(out))
"""


@pytest.mark.parametrize("allow", ["extractors,scorers,compressors,retrievers,models,policies,sources,"
                                   "memory_backend,evictors", ""])
def test_plugin_allow_list(allow, tmp_path):
    env = {**os.environ, "MUKV_PLUGINS": allow}  # without it every plugin loads (tests/test_registry.py)
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert "lancedb" not in got["backends"]
    assert not got["disk_imported"] and not got["disk_imported_after"]  # the excluded plugin never ran
    kind, msg = got["error"]
    assert kind == "UnknownPluginError" and "lancedb" in msg
    if allow == "":
        assert got["backends"] == [] and got["models"] == []
    else:
        assert got["backends"] == ["memory"] and "registered backends: memory" in msg


# ------------------------------------------------------------------------------ checkpoints
class _Evil:
    """Unpickling this creates a folder: proof that a pickle was opened."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


@pytest.fixture(scope="module")
def checkpoint(tiny_model, tmp_path_factory):
    """The tiny model saved as a local safetensors checkpoint."""
    d = tmp_path_factory.mktemp("ckpt") / "tiny-llava-ov"
    tiny_model.model.save_pretrained(d, safe_serialization=True)
    tiny_model.tokenizer.save_pretrained(d)
    assert any(d.glob("*.safetensors"))
    return d


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was about to be loaded")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


def test_pickle_checkpoint_is_refused(checkpoint, tmp_path, no_unpickling):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text((checkpoint / "config.json").read_text())
    marker = tmp_path / "pwned"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(str(marker))))
    with pytest.raises(mukv.StoreError, match="safetensors only") as err:
        mukv.Session(model=d, backend="memory")
    assert_clear_error(err.value)
    assert not marker.exists()


def test_pickle_beside_safetensors_is_never_opened(checkpoint, tmp_path, no_unpickling):
    import shutil

    d = tmp_path / "both"
    shutil.copytree(checkpoint, d)
    marker = tmp_path / "pwned"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps(_Evil(str(marker))))
    (d / "training_args.bin").write_bytes(pickle.dumps(_Evil(str(marker))))
    s = mukv.Session(model=d, backend="memory", config=FAST)
    s.feed(frames(2))
    s.ask("what is it?")
    s.close()
    assert not marker.exists()


def _weights(d):
    return next(d.glob("*.safetensors"))


BAD_CHECKPOINTS = {
    # once raw safetensors errors (SafetensorError is no OSError or ValueError)
    "garbage weights": (lambda d: _weights(d).write_bytes(os.urandom(5000)), "cannot load the checkpoint"),
    "truncated weights": (lambda d: os.truncate(_weights(d), _weights(d).stat().st_size // 2),
                          "cannot load the checkpoint"),
    "empty weights": (lambda d: _weights(d).write_bytes(b""), "cannot load the checkpoint"),
    "a config of the wrong shape": (lambda d: (d / "config.json").write_text(
        json.dumps({**json.loads((d / "config.json").read_text()), "text_config": 5})), "cannot load the checkpoint"),
    # once accepted, or a raw error when the adapter built its normalisation
    "image_mean as text": (lambda d: (d / "preprocessor_config.json").write_text('{"image_mean": "x"}'),
                           "image_mean must be three finite numbers"),
    "image_std of 0": (lambda d: (d / "preprocessor_config.json").write_text('{"image_std": [0.5, 0, 0.5]}'),
                       "image_std must be three finite numbers above 0"),
    "image_mean of two": (lambda d: (d / "preprocessor_config.json").write_text('{"image_mean": [0.5, 0.5]}'),
                          "image_mean must be three"),
    "processor config as a list": (lambda d: (d / "preprocessor_config.json").write_text("[1]"),
                                   "must hold a JSON object"),
    "processor config not JSON": (lambda d: (d / "preprocessor_config.json").write_text("{nope"),
                                  "cannot load the checkpoint"),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_a_damaged_checkpoint_is_a_store_error_naming_it(checkpoint, tmp_path, case):
    import shutil

    d = tmp_path / "damaged"
    shutil.copytree(checkpoint, d)
    damage, words = BAD_CHECKPOINTS[case]
    damage(d)
    with pytest.raises(mukv.StoreError, match=words) as err:
        mukv.Session(model=d, backend="memory")
    assert_clear_error(err.value)
    assert str(d) in str(err.value)


def test_the_installed_tiny_checkpoint_damaged_is_a_store_error(tmp_path, monkeypatch):
    # mukv-tiny loads through the preset, not through a directory given as the model
    import shutil

    from mukv.plugins.models import mukv_tiny

    d = tmp_path / "mukv-tiny"
    shutil.copytree(mukv_tiny.asset_dir(), d)
    _weights(d).write_bytes(os.urandom(3000))
    monkeypatch.setattr(mukv_tiny, "asset_dir", lambda: d)
    with pytest.raises(mukv.StoreError, match="cannot load the checkpoint .*SafetensorError") as err:
        mukv_tiny.load_mukv_tiny()
    assert_clear_error(err.value)


def test_no_pickle_loading_in_the_source():
    """No torch.load / pickle.load / numpy allow_pickle anywhere in mukv, its plugins or backends."""
    pattern = re.compile(r"torch\.load\(|pickle\.loads?\(|allow_pickle\s*=\s*True|joblib\.load|dill\.load"
                         r"|yaml\.load\(|weights_only\s*=\s*False")
    hits = [f"{p.relative_to(ROOT)}:{i}" for folder in ("mukv", "plugins", "backends")
            for p in sorted((ROOT / folder).rglob("*.py"))
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


# ------------------------------------------------------------------------------ read-only stores
def test_read_only_store_is_never_written(tiny_model, tmp_path):
    from mukv.backends.disk import TieredBackend, verify_store

    path = tmp_path / "st"
    with mukv.Session(model=tiny_model, backend="lancedb", path=path, config=FAST) as s:
        s.feed(frames(6))
    before = tree_digest(path)
    assert verify_store(str(path)).ok
    assert tree_digest(path) == before  # verifying writes nothing
    r = mukv.Session.open(path, model=tiny_model, backend_options={"read_only": True})
    snap = (r.stats(), r._last_time, r._frame_hw)
    for attempt in (lambda: r.feed(frames(2, seed=1)),
                    lambda: r.feed(frames(2, seed=1), timestamps=[100.0, 101.0]),
                    lambda: r.feed_from("iterator", list(frames(2, seed=2))),
                    lambda: r.backend.set_state("frames_seen", 0),
                    lambda: r.backend.add(r.backend and __import__("disk_synth").synth_blocks("frame", 0, 1))):
        with pytest.raises(mukv.StoreError, match="read-only") as err:
            attempt()
        assert_clear_error(err.value)
    assert (r.stats(), r._last_time, r._frame_hw) == snap  # nothing moved in the session either
    assert r.ask("what color was the car?").blocks
    r.backend.flush()  # a no-op
    r.close()
    assert tree_digest(path) == before
    with pytest.raises(mukv.StoreError, match="no mukv store to open read-only"):
        TieredBackend(tiny_model.layout, str(tmp_path / "none"), "cpu", read_only=True)
    assert not (tmp_path / "none").exists()
