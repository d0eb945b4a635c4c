"""faiss vector indexes for very large block-vector sets: "faiss", "faiss_cpu", "faiss_gpu".

Cosine similarity is the inner product of L2-normalised vectors. An index is
exact (``IndexFlatIP``) while it holds fewer than ``ivf_threshold`` vectors;
past that it trains an inverted-file index (``IndexIVFFlat``, about
``4 * sqrt(n)`` lists) on the vectors it holds and searches ``nprobe`` lists,
retraining when it has grown fourfold since the last training.

* ``"faiss"``: faiss-gpu when it is importable and sees a GPU and the index's
  device is CUDA (``pip install 'mukv[faiss-gpu]'``), faiss-cpu otherwise
  (``pip install 'mukv[faiss]'``);
* ``"faiss_cpu"``: always on the CPU;
* ``"faiss_gpu"``: on the GPU, or an error saying why not.

For the hot tier's sizes a flat search in torch on the GPU is faster; these
indexes are for stores of millions of blocks. faiss is imported when an index
is built, never at plugin load.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

import mukv
from mukv.errors import ConfigError
from mukv.interfaces import VectorIndex


def _import_faiss() -> Any:
    try:
        import faiss  # noqa: PLC0415 (heavy optional import, only when selected)
    except ImportError:
        raise ConfigError(
            "the faiss index needs faiss: pip install 'mukv[faiss]' (CPU) or 'mukv[faiss-gpu]' (CUDA 12 GPUs)"
        ) from None
    return faiss


def faiss_gpu_available() -> bool:
    """Whether the importable faiss has GPU support and sees at least one GPU."""
    try:
        faiss = _import_faiss()
    except ConfigError:
        return False
    return hasattr(faiss, "StandardGpuResources") and getattr(faiss, "get_num_gpus", lambda: 0)() > 0


class FaissIndex(VectorIndex):
    """A faiss index over unit-normalised block vectors (inner product = cosine).

    Args:
        dim: V, vector dimension.
        device: where query results are returned; a CUDA device also selects
            faiss-gpu for ``"faiss"`` when it is available.
        ivf_threshold: vectors held before switching from exact search to IVF.
        nlist: IVF lists (default ``4 * sqrt(n)``, between 16 and 65536).
        nprobe: IVF lists searched per query.
    """

    #: "auto", "cpu" or "gpu".
    placement: ClassVar[str] = "auto"

    def __init__(self, dim: int, device: torch.device | str = "cpu", ivf_threshold: int = 200_000,
                 nlist: int | None = None, nprobe: int = 32):
        if isinstance(dim, bool) or not isinstance(dim, numbers.Integral):
            raise ConfigError(f"faiss index: dim must be a positive integer; got {dim!r}"[:200])
        for name, value, least in (("ivf_threshold", ivf_threshold, 0), ("nprobe", nprobe, 1), ("nlist", nlist, 1)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)
                                      or value < least):
                raise ConfigError(f"faiss index: {name} must be an integer of at least {least}; got {value!r}"[:200])
        super().__init__(dim, device)
        if dim <= 0:
            raise ConfigError(f"faiss index: dim must be positive; got {dim}")
        self._faiss = _import_faiss()
        self.ivf_threshold, self.nlist, self.nprobe = ivf_threshold, nlist, nprobe
        self.use_gpu = self._choose_gpu()
        self._gpu_res = self._faiss.StandardGpuResources() if self.use_gpu else None
        self._held = np.empty((0, dim), dtype=np.float32)  # unit vectors, for (re)training IVF
        self._n = 0
        self._trained_at = 0  # vectors held when IVF was last trained (0: exact search)
        self._index = self._place(self._faiss.IndexFlatIP(dim))

    def _choose_gpu(self) -> bool:
        if self.placement == "cpu":
            return False
        available = faiss_gpu_available()
        if self.placement == "gpu":
            if not available:
                raise ConfigError("index 'faiss_gpu': this faiss has no GPU support or sees no GPU; "
                                  "pip install 'mukv[faiss-gpu]', or choose 'faiss' / 'faiss_cpu'")
            return True
        return available and self.device.type == "cuda"

    def _place(self, index: Any) -> Any:
        if not self.use_gpu:
            return index
        gpu = self.device.index if self.device.type == "cuda" and self.device.index is not None else 0
        return self._faiss.index_cpu_to_gpu(self._gpu_res, gpu, index)

    @property
    def kind(self) -> str:
        """"flat" or "ivf", and where it runs ("flat/cpu", "ivf/gpu", ...)."""
        return f"{'ivf' if self._trained_at else 'flat'}/{'gpu' if self.use_gpu else 'cpu'}"

    def __len__(self) -> int:
        return self._n

    def _unit(self, vectors: torch.Tensor) -> np.ndarray:
        v = torch.as_tensor(vectors)
        if v.ndim == 1:
            v = v[None]
        if v.ndim != 2 or v.shape[1] != self.dim:
            raise ValueError(f"faiss index: expected vectors [n, {self.dim}]; got {tuple(v.shape)}")
        v = F.normalize(v.detach().float(), dim=-1)
        return np.ascontiguousarray(v.cpu().numpy(), dtype=np.float32)

    def add(self, vectors: torch.Tensor) -> None:
        """Append ``[n, V]`` vectors; their ids continue from the current size."""
        unit = self._unit(vectors)
        if unit.shape[0] == 0:
            return
        need = self._n + unit.shape[0]
        if need > self._held.shape[0]:
            grown = np.empty((max(need, 2 * self._held.shape[0], 1024), self.dim), dtype=np.float32)
            grown[: self._n] = self._held[: self._n]
            self._held = grown
        self._held[self._n : need] = unit
        self._n = need
        if self._n >= self.ivf_threshold and (not self._trained_at or self._n >= 4 * self._trained_at):
            self._train_ivf()
        else:
            self._index.add(unit)

    def _train_ivf(self) -> None:
        faiss, n = self._faiss, self._n
        nlist = self.nlist or int(min(65536, max(16, 4 * math.sqrt(n))))
        nlist = min(nlist, max(1, n // 39))  # faiss wants >= 39 training points per list
        quantizer = faiss.IndexFlatIP(self.dim)
        ivf = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        data = self._held[:n]
        sample = data if n <= 256 * nlist else data[np.random.default_rng(0).choice(n, 256 * nlist, replace=False)]
        ivf.train(sample)
        ivf.add(data)
        ivf.nprobe = min(self.nprobe, nlist)
        self._index = self._place(ivf)
        self._trained_at = n

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``queries [Q, V]`` -> ``(scores [Q, k'], ids [Q, k'])``, best first, ``k' = min(k, len)``.

        With IVF fewer than ``k'`` neighbours can exist in the probed lists; the
        result is cut to the columns every query filled.
        """
        q = self._unit(queries)
        kk = min(int(k), self._n)
        if kk <= 0:
            return (torch.empty(q.shape[0], 0, device=self.device),
                    torch.empty(q.shape[0], 0, dtype=torch.int64, device=self.device))
        scores, ids = self._index.search(q, kk)
        valid = int((ids >= 0).all(axis=0).sum()) if self._trained_at else kk
        scores, ids = scores[:, :valid], ids[:, :valid]
        return (torch.from_numpy(np.ascontiguousarray(scores)).to(self.device),
                torch.from_numpy(np.ascontiguousarray(ids)).to(self.device, torch.int64))


class FaissCPUIndex(FaissIndex):
    """:class:`FaissIndex` always on the CPU (faiss-cpu)."""

    placement = "cpu"


class FaissGPUIndex(FaissIndex):
    """:class:`FaissIndex` on the GPU (faiss-gpu); an error where that is not available."""

    placement = "gpu"


@mukv.hookimpl
def mukv_register_indexes(register):
    register("faiss", FaissIndex)
    register("faiss_cpu", FaissCPUIndex)
    register("faiss_gpu", FaissGPUIndex)
