"""A storage backend: where compressed blocks live. This one keeps them in
per-level lists of tensors, and counts the bytes paged in for questions."""

from typing import Any

import torch
import torch.nn.functional as F

import mukv
from mukv.blocks import CompressedBlocks, KVLayout
from mukv.errors import RetrievalError, StoreError
from mukv.interfaces import BlockMeta, StorageBackend

META = ("frame_start", "frame_end", "t_start", "t_end")


class ListBackend(StorageBackend):
    name = "list"

    def __init__(self, layout: KVLayout, path=None, device="cpu", **options: Any):
        if path is not None or options:
            raise StoreError("the list backend takes no path and no options")
        self.layout, self.device = layout, torch.device(device)
        self.levels: dict[str, dict[str, list[torch.Tensor]]] = {}
        self.paged_in = 0  # bytes handed to questions

    # -- writing: a batch of blocks of one level, all of it or nothing ----------
    def add(self, blocks: CompressedBlocks) -> torch.Tensor:
        vectors = blocks.vectors.float()
        columns = {
            "kv": blocks.kv,  # [B, Y, 2, H, K, D]
            "vectors": vectors,  # [B, V]
            "unit": F.normalize(vectors, dim=-1),
            "positions": blocks.positions,  # [B, K]
            "tokens": blocks.token_index,  # [B, K]
            **{key: getattr(blocks, key) for key in META},  # [B] each
        }
        columns = {k: v.detach().to(self.device).clone() for k, v in columns.items()}
        start = self.count(blocks.level)
        level = self.levels.setdefault(blocks.level, {k: [] for k in columns})
        for key, value in columns.items():
            level[key].append(value)
        return torch.arange(start, start + len(blocks))

    # -- reading ---------------------------------------------------------------
    def _column(self, level: str, key: str, ids=None) -> torch.Tensor:
        column = torch.cat(self.levels[level][key])
        if ids is None:
            return column
        ids = torch.as_tensor(ids, dtype=torch.long, device=self.device).reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= len(column)):
            raise RetrievalError(f"level {level!r}: block ids out of range")
        return column.index_select(0, ids)

    def count(self, level: str) -> int:
        return sum(len(t) for t in self.levels.get(level, {}).get("kv", []))

    def search(self, level, query, k, within=None):
        if self.count(level) == 0 or k <= 0:
            return torch.empty(0, dtype=torch.long), torch.empty(0)
        unit_query = F.normalize(query.float().to(self.device), dim=0)
        sims = self._column(level, "unit") @ unit_query  # cosine similarity, [N]
        if within is not None:  # only blocks inside one of the [start, end) ranges
            fs = self._column(level, "frame_start")[:, None]
            fe = self._column(level, "frame_end")[:, None]
            lo, hi = within[None, :, 0], within[None, :, 1]
            inside = ((fs >= lo) & (fe <= hi)).any(dim=1)
            sims = sims.masked_fill(~inside, float("-inf"))
            k = min(k, int(inside.sum()))
        scores, ids = sims.topk(min(k, len(sims)))
        return ids, scores

    def vectors(self, level, ids):
        return self._column(level, "vectors", ids)

    def metadata(self, level, ids):
        return BlockMeta(*(self._column(level, key, ids) for key in META))

    def load_kv(self, level, ids):
        kv = self._column(level, "kv", ids)  # [n, Y, 2, H, K, D]
        self.paged_in += kv.numel() * kv.element_size()
        return kv

    def positions(self, level, ids):
        return self._column(level, "positions", ids)

    def token_index(self, level, ids):
        return self._column(level, "tokens", ids)

    def stats(self):
        out = {}
        for level in self.levels:
            n, k = self.count(level), self.levels[level]["kv"][0].shape[4]
            nbytes = n * k * self.layout.token_bytes()
            out[level] = {"blocks": n, "tokens": n * k, "bytes": nbytes}
        return out


@mukv.hookimpl
def mukv_register_backends(register):
    register("list", ListBackend)


if __name__ == "__main__":
    import sys

    mukv.register_plugin(sys.modules[__name__], name="list_backend")
    frames = torch.randint(0, 255, (12, 64, 64, 3), dtype=torch.uint8)
    model = mukv.Session(model="tiny-llava-ov").model
    answers = {}
    for backend in ("memory", "list"):
        with mukv.Session(model=model, backend=backend) as session:
            session.feed(frames)
            answers[backend] = session.ask("what happened?", max_new_tokens=4)
            if backend == "list":
                print(f"paged in {session.backend.paged_in:,} bytes")
                print(session.stats()["levels"])
    ids = {name: [b.block_id for b in a.blocks] for name, a in answers.items()}
    assert ids["list"] == ids["memory"]
    same = answers["list"].text == answers["memory"].text
    print("same blocks and answer as the memory backend:", same)
    mukv.unregister_plugin(sys.modules[__name__])
