"""A scorer with settings: declared as a pydantic model, selected as {"name": ..., setting: value}."""

import torch
from pydantic import Field

import mukv
from mukv.interfaces import TokenScorer
from mukv.specs import PluginSettings


class CenterSettings(PluginSettings):
    """Settings of the "center" scorer."""

    sigma: float = Field(default=8.0, gt=0)
    """Width of the Gaussian, in tokens."""

    offset: float = 0.0
    """Where the Gaussian is centred, in tokens from the block's middle."""


class CenterScorer(TokenScorer):
    """Tokens near the middle of a block score highest (a Gaussian)."""

    Settings = CenterSettings  # the configuration validates against it; the values are self.settings

    def score(self, blocks):
        length = blocks.keys.shape[2]  # keys [B, H, L, D]
        pos = torch.arange(length, dtype=torch.float32) - (length - 1) / 2 - self.settings.offset
        return torch.exp(-(pos / self.settings.sigma) ** 2).expand(blocks.keys.shape[0], -1)  # [B, L]


class Plugin:
    @mukv.hookimpl
    def mukv_register_scorers(self, register):
        register("center", CenterScorer)


plugin = Plugin()
mukv.register_plugin(plugin, name="center")
try:
    frames = torch.randint(0, 255, (4, 64, 64, 3), dtype=torch.uint8)
    model = mukv.Session(model="tiny-llava-ov").model  # load once, share
    for spec in ("center", {"name": "center", "offset": 40}):
        with mukv.Session(model=model, config={"scoring": {"scorer": spec}}) as session:
            session.feed(frames)
            kept = session.backend.token_index("frame", torch.arange(1))[0]
            print(f"{spec!s:<32} keeps tokens {kept.min().item()}..{kept.max().item()} of each frame")
    # the same scorer as an object (it lives in this process only: not for a stored stream)
    scorer = CenterScorer.from_settings(sigma=2.0)
    with mukv.Session(model=model, config={"scoring": {"scorer": scorer}}) as session:
        print("an object:", session.levels[0].scorer is scorer, session.levels[0].scorer.settings)
    try:
        mukv.Session(model=model, config={"scoring": {"scorer": {"name": "center", "sigma": "wide"}}})
    except mukv.ConfigError as error:
        print(error)  # names the field (scoring.scorer.sigma), the scorer, its plugin and package
finally:
    mukv.unregister_plugin(plugin)
