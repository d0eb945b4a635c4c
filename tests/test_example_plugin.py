"""The worked third-party plugin, examples/mukv-keynorm, installed through its entry point."""

from __future__ import annotations

import json

import pytest
import torch

import mukv

keynorm = pytest.importorskip(
    "mukv_keynorm", reason="the example plugin is not installed: pip install -e examples/mukv-keynorm")


def test_it_is_registered_from_its_package_through_the_entry_point(capsys):
    from mukv.cli import main

    entry = mukv.get_registry().entries["scorers"]["key_norm"]
    assert entry.component is keynorm.KeyNormScorer
    assert entry.plugin == "keynorm" and entry.package == "mukv-keynorm 0.1.0"
    assert main(["plugins", "--role", "scorers", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    row = next(r for r in rows if r["name"] == "key_norm")
    assert {k: row[k] for k in ("role", "plugin", "package", "status")} == {
        "role": "scorers", "plugin": "keynorm", "package": "mukv-keynorm 0.1.0", "status": "ok"}
    assert row["settings"] == {"invert": False}  # its setting and default, for tools
    assert row["settings_schema"]["properties"]["invert"]["type"] == "boolean"


def test_it_changes_which_tokens_are_kept(tiny_model, frames):
    f = frames(8, seed=3)
    kept = {}
    for scorer in ("dual", "key_norm"):
        with mukv.Session(model=tiny_model, config={"scoring": {"scorer": scorer}}) as s:
            s.feed(f)
            kept[scorer] = {lv: s.backend.token_index(lv, torch.arange(s.backend.count(lv)))
                            for lv in ("patch", "frame", "segment")}
            keys = None
            if scorer == "key_norm":
                # what key_norm should keep for frame 0: the 19 tokens of largest mean key norm
                embeds = s.model.encode_frames(torch.from_numpy(f[:1]))
                kv, _, _ = s.model.prefill_blocks(s.prefix, embeds, attention=False)
                keys = kv[-1, 0]  # [1, H, 196, D]
                expect = keys.float().norm(dim=-1).mean(dim=1).topk(19, dim=1).indices.sort(dim=1).values[0]
                assert kept["key_norm"]["frame"][0].tolist() == expect.tolist()
    for level in ("patch", "frame"):
        assert kept["dual"][level].shape == kept["key_norm"][level].shape
        assert not torch.equal(kept["dual"][level], kept["key_norm"][level]), level


def test_turned_off_by_the_allow_list(monkeypatch):
    import mukv.registry as reg

    monkeypatch.setenv("MUKV_PLUGINS", "extractors,scorers,compressors,retrievers,models,policies,memory_backend")
    reg.reset()
    try:
        assert "key_norm" not in mukv.get_registry().names("scorers")
    finally:
        monkeypatch.delenv("MUKV_PLUGINS")
        reg.reset()
    assert "key_norm" in mukv.get_registry().names("scorers")


def test_invert_keeps_the_lowest_key_norms(tiny_model, frames):
    """{"name": "key_norm", "invert": true} keeps exactly the 19 tokens of lowest mean key norm."""
    f = frames(4, seed=5)
    kept = {}
    for invert in (False, True):
        cfg = {"scoring": {"scorer": {"name": "key_norm", "invert": invert}}}
        with mukv.Session(model=tiny_model, config=cfg) as s:
            s.feed(f)
            kept[invert] = s.backend.token_index("frame", torch.arange(4))
            # the default is written as the bare name, a set setting is kept
            assert s.config.scoring.scorer == ({"name": "key_norm", "invert": True} if invert else "key_norm")
    embeds = tiny_model.encode_frames(torch.from_numpy(f[:1]))
    kv, _, _ = tiny_model.prefill_blocks(tiny_model.prefix(), embeds, attention=False)
    norms = kv[-1, 0].float().norm(dim=-1).mean(dim=1)  # [1, 196]
    lowest = (-norms).topk(19, dim=1).indices.sort(dim=1).values
    assert kept[True][:1].tolist() == lowest.tolist()
    assert not torch.equal(kept[True], kept[False])


def test_invert_is_validated_naming_the_field_and_the_package(tiny_model):
    with pytest.raises(mukv.ConfigError) as err:
        mukv.Session(model=tiny_model, config={"scoring": {"scorer": {"name": "key_norm", "invert": "sideways"}}})
    msg = str(err.value)
    assert "scoring.scorer.invert" in msg and "key_norm" in msg and "mukv-keynorm 0.1.0" in msg
    with pytest.raises(mukv.ConfigError, match="scoring.scorer.inverted: unknown setting; settings: invert"):
        mukv.Session(model=tiny_model, config={"scoring": {"scorer": {"name": "key_norm", "inverted": True}}})


def test_a_configured_object_is_accepted_where_a_name_is(tiny_model, frames):
    f = frames(4, seed=5)
    with mukv.Session(model=tiny_model, config={"scoring": {"scorer": {"name": "key_norm", "invert": True}}}) as s:
        s.feed(f)
        by_name = s.backend.token_index("frame", torch.arange(4))
    scorer = keynorm.KeyNormScorer.from_settings(invert=True)
    with mukv.Session(model=tiny_model, config={"scoring": {"scorer": scorer}}) as s:
        s.feed(f)
        assert s.levels[0].scorer is scorer
        assert torch.equal(s.backend.token_index("frame", torch.arange(4)), by_name)
