"""A retriever: which stored blocks answer a question."""

import math

import torch

import mukv
from pydantic import Field

from mukv.blocks import Hits, Query
from mukv.config import MukvConfig
from mukv.interfaces import BlockIndex, Retriever
from mukv.specs import PluginSettings


class RecencySettings(PluginSettings):
    """Settings of the "recency" retriever (each field: a type, a default, a docstring)."""

    weight: float = Field(default=0.2, ge=0.0)
    """Bonus of a block stored just now, added to its cosine similarity."""

    half_life: float = Field(default=600.0, gt=0.0)
    """Seconds after which the bonus has halved."""


class RecencyRetriever(Retriever):
    """Cosine similarity plus a bonus for recent blocks, which halves every
    ``half_life`` seconds. Over-retrieves by ``retrieval.over_retrieval``,
    rescores the candidates with their age, keeps the top-k of each level."""

    Settings = RecencySettings

    def __init__(self, over_retrieval=2.0, weight=0.2, half_life=600.0):
        self.over_retrieval, self.weight = over_retrieval, weight
        self.half_life = half_life

    @classmethod
    def from_config(cls, config: MukvConfig, settings: RecencySettings | None = None) -> "RecencyRetriever":
        s = settings or RecencySettings()  # validated from {"name": "recency", "weight": ..., ...}
        return cls(over_retrieval=config.retrieval.over_retrieval, weight=s.weight, half_life=s.half_life)

    def retrieve(self, query: Query, index: BlockIndex, top_k: dict[str, int]):
        out = []
        for level, k in top_k.items():
            if k <= 0:
                continue
            n = math.ceil(k * self.over_retrieval)
            ids, scores = index.search(level, query.vector, n)  # best first
            ends = index.metadata(level, ids).t_end.to(scores.device)
            age = (query.time - ends).float()  # seconds ago, [n]
            scores = scores + self.weight * torch.exp2(-age / self.half_life)
            order = scores.argsort(descending=True)[:k]
            out.append(Hits(level, ids[order], scores[order]))
        return out


@mukv.hookimpl
def mukv_register_retrievers(register):
    register("recency", RecencyRetriever)


if __name__ == "__main__":
    import sys

    mukv.register_plugin(sys.modules[__name__], name="recency")
    # the name alone takes the default settings; a dict with "name" sets some
    config = {"retrieval": {"retriever": {"name": "recency", "weight": 0.5, "half_life": 30}}}
    with mukv.Session(model="tiny-llava-ov", config=config) as session:
        print("settings:", session.retriever.weight, session.retriever.half_life)
        # 40 frames = 80 s of stream at 0.5 fps
        session.feed(torch.randint(0, 255, (40, 64, 64, 3), dtype=torch.uint8))
        top_k = {"patch": 4, "frame": 4, "segment": 2}
        answer = session.ask("what just happened?", top_k=top_k, max_new_tokens=2)
        for b in answer.blocks:
            span = f"{b.t_start:5.1f}-{b.t_end:5.1f} s"
            print(f"{b.level:<8} t={span}  score {b.score:.3f}")
    try:  # a bad setting names the field and the plugin
        mukv.Session(model="tiny-llava-ov", config={"retrieval": {"retriever": {"name": "recency", "half_life": -1}}})
    except mukv.ConfigError as error:
        print(error)
    mukv.unregister_plugin(sys.modules[__name__])
