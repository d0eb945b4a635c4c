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
    assert {"role": "scorers", "name": "key_norm", "plugin": "keynorm", "package": "mukv-keynorm 0.1.0"} in rows


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
