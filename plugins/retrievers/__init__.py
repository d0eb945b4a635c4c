"""Built-in retrievers: MuKV's semi-hierarchical retrieval, flat cosine, ReKV's per-layer
retrieval, cross-level fusion, and the baselines (uniform sampling, sliding window, full context)."""

from __future__ import annotations

import mukv

from .baselines import AllRetriever, RecentRetriever, UniformRetriever
from .cosine import CosineRetriever
from .fusion import FusionRetriever
from .hierarchical import HierarchicalRetriever
from .layerwise import LayerwiseRetriever
from .semi_hierarchical import SemiHierarchicalRetriever


@mukv.hookimpl
def mukv_register_retrievers(register):
    register("semi_hierarchical", SemiHierarchicalRetriever)
    register("cosine", CosineRetriever)
    register("hierarchical", HierarchicalRetriever)
    register("uniform", UniformRetriever)
    register("recent", RecentRetriever)
    register("all", AllRetriever)
    register("layerwise", LayerwiseRetriever)
    register("fusion", FusionRetriever)
