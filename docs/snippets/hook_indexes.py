"""mukv_register_indexes: a vector index for block vectors (cosine similarity)."""

import numpy as np
import torch

import mukv
from mukv.interfaces import VectorIndex


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)


class NumpyFlatIndex(VectorIndex):
    """Exact search with numpy: a stand-in for faiss or a GPU index."""

    def __init__(self, dim: int, device="cpu"):
        super().__init__(dim, device)
        self.vectors = np.zeros((0, dim), dtype=np.float32)  # unit vectors [N, V]

    def add(self, vectors: torch.Tensor) -> None:
        new = unit(vectors.detach().float().cpu().numpy())
        self.vectors = np.concatenate([self.vectors, new])

    def search(self, queries: torch.Tensor, k: int):
        sims = unit(queries.detach().float().cpu().numpy()) @ self.vectors.T  # [Q, N]
        ids = np.argsort(-sims, axis=1)[:, :k]
        scores = np.take_along_axis(sims, ids, axis=1)
        return torch.from_numpy(scores), torch.from_numpy(ids)  # best first

    def __len__(self) -> int:
        return len(self.vectors)


@mukv.hookimpl
def mukv_register_indexes(register):
    register("numpy_flat", NumpyFlatIndex)


if __name__ == "__main__":
    import sys

    mukv.register_plugin(sys.modules[__name__], name="numpy_flat")
    index_class = mukv.get_registry().get("indexes", "numpy_flat")
    index = index_class(dim=32, device="cpu")
    vectors = torch.randn(1000, 32)
    index.add(vectors)
    scores, ids = index.search(vectors[:3] + 0.01 * torch.randn(3, 32), k=5)
    print(len(index), "vectors; nearest to the 3 queries:", ids[:, 0].tolist())
    mukv.unregister_plugin(sys.modules[__name__])
