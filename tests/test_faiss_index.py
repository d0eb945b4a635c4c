"""The faiss vector index plugin ("faiss", "faiss_cpu", "faiss_gpu"), with faiss-cpu."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("faiss")

from mukv.errors import ConfigError  # noqa: E402
from mukv.plugins.faiss_index import FaissIndex, faiss_gpu_available  # noqa: E402
from mukv.registry import registry  # noqa: E402


def exact(vectors: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    sims = F.normalize(queries, dim=-1) @ F.normalize(vectors, dim=-1).T
    return sims.topk(k, dim=1)


def test_registered_by_name():
    names = registry().names("indexes")
    assert {"faiss", "faiss_cpu", "faiss_gpu"} <= set(names)
    index = registry().get("indexes", "faiss")(dim=8, device="cpu")
    assert isinstance(index, FaissIndex) and index.kind == "flat/cpu"


def test_flat_search_is_exact_cosine_and_ids_continue():
    gen = torch.Generator().manual_seed(0)
    vectors = torch.randn(300, 32, generator=gen) * torch.rand(300, 1, generator=gen)  # norms vary
    queries = torch.randn(4, 32, generator=gen)
    index = registry().get("indexes", "faiss_cpu")(dim=32)
    for chunk in vectors.split(70):  # ids continue across adds
        index.add(chunk)
    assert len(index) == 300
    scores, ids = index.search(queries, 10)
    ref_scores, ref_ids = exact(vectors, queries, 10)
    assert ids.dtype == torch.int64 and ids.shape == (4, 10)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)


def test_switches_to_ivf_past_the_threshold():
    gen = torch.Generator().manual_seed(1)
    centers = torch.randn(20, 16, generator=gen) * 4
    vectors = centers[torch.randint(0, 20, (4000,), generator=gen)] + torch.randn(4000, 16, generator=gen)
    index = FaissIndex(dim=16, ivf_threshold=2000, nprobe=8)
    index.add(vectors[:1000])
    assert index.kind == "flat/cpu"
    index.add(vectors[1000:])
    assert index.kind == "ivf/cpu" and len(index) == 4000
    queries = vectors[:50] + 0.01 * torch.randn(50, 16, generator=gen)
    _, ids = index.search(queries, 5)
    _, ref_ids = exact(vectors, queries, 5)
    recall = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(ids, ref_ids)) / ref_ids.numel()
    assert recall > 0.9
    assert bool((ids[:, 0] == torch.arange(50)).float().mean() > 0.9)  # a vector finds itself


def test_empty_and_small_indexes():
    index = FaissIndex(dim=4)
    scores, ids = index.search(torch.randn(2, 4), 3)
    assert scores.shape == (2, 0) and ids.shape == (2, 0)
    index.add(torch.randn(2, 4))
    _, ids = index.search(torch.randn(4), 5)  # one query as [V]; k larger than the index
    assert ids.shape == (1, 2)
    with pytest.raises(ValueError, match=r"\[n, 4\]"):
        index.add(torch.randn(3, 5))


def test_gpu_placement_is_explicit():
    if faiss_gpu_available():
        pytest.skip("this faiss has GPU support")
    with pytest.raises(ConfigError, match="faiss_gpu"):
        registry().get("indexes", "faiss_gpu")(dim=4, device="cpu")
    assert FaissIndex(dim=4, device="cpu").use_gpu is False
