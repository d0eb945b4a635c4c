"""A scorer registered at runtime, without a package: for a notebook or a test."""

import torch

import mukv


class Plugin:
    @mukv.hookimpl
    def mukv_register_scorers(self, register):
        # A plain function is enough: last-layer values [B, H, L, D] -> [B, L]
        register("value_norm", lambda b: b.kv[-1, 1].float().norm(dim=-1).mean(dim=1))


plugin = Plugin()
mukv.register_plugin(plugin, name="value_norm")
try:
    config = {"scoring": {"scorer": "value_norm"}}
    with mukv.Session(model="tiny-llava-ov", config=config) as session:
        session.feed(torch.randint(0, 255, (4, 64, 64, 3), dtype=torch.uint8))
        print(type(session.levels[0].scorer).__name__, session.stats()["levels"])
finally:
    mukv.unregister_plugin(plugin)
