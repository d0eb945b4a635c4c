"""mukv_register_evictors: which blocks leave the hot tier first when it is full."""

import torch

import mukv
from mukv.interfaces import EvictionPolicy, HotBlocks


class OldestSegmentFirst(EvictionPolicy):
    """Whole segments, oldest first, ignoring retrievals (a simple baseline)."""

    def victims(self, candidates: HotBlocks, need_bytes: int) -> torch.Tensor:
        key = candidates.segment * (1 << 32) + candidates.stored_at
        order = torch.argsort(key, stable=True)
        freed = candidates.nbytes[order].cumsum(0)
        n = min(int((freed < need_bytes).sum()) + 1, len(order))  # enough bytes ...
        last = candidates.segment[order[n - 1]]
        n = int((candidates.segment[order] <= last).sum())  # ... whole segments
        return order[:n]  # positions in candidates, in eviction order


@mukv.hookimpl
def mukv_register_evictors(register):
    register("oldest_segment", OldestSegmentFirst)


if __name__ == "__main__":
    import sys

    mukv.register_plugin(sys.modules[__name__], name="oldest_segment")
    hot = HotBlocks(
        level=["segment", "frame", "frame", "segment"],
        ids=torch.tensor([0, 0, 4, 1]),
        segment=torch.tensor([0, 0, 1, 1]),
        nbytes=torch.tensor([400, 40, 40, 400]),
        last_used=torch.tensor([9, 3, 1, 2]),
        stored_at=torch.tensor([0, 0, 1, 1]),
    )
    victims = OldestSegmentFirst().victims(hot, need_bytes=100)
    print("evict positions:", victims.tolist())  # segment 0: [0, 1]

    # In a store, the disk backend's hot tier evicts with the policy it is given.
    options = {"hot_bytes": 2 << 20, "hot_slab_bytes": 512 << 10,
               "eviction": "oldest_segment"}
    with mukv.Session(model="tiny-llava-ov", backend="lancedb", path="evict.mukv",
                      backend_options=options) as session:
        session.feed(torch.randint(0, 255, (32, 64, 64, 3), dtype=torch.uint8))
        hot_tier = session.backend.tier_stats()["hot"]
        print(f"hot tier: {hot_tier['used_bytes']:,} bytes used, "
              f"{hot_tier['evicted']} blocks evicted")
    mukv.unregister_plugin(sys.modules[__name__])
