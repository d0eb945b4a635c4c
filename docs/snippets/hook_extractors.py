"""mukv_register_extractors: a level that cuts frames into left and right halves."""

import torch

import mukv
from mukv.config import LevelConfig
from mukv.interfaces import GranularityExtractor


class HalvesExtractor(GranularityExtractor):
    """Two blocks per frame: the left and the right half of its token grid."""

    def split(self, level: LevelConfig, grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        cells = torch.arange(h * w).view(h, w)  # token index of each grid cell
        left, right = cells[:, : w // 2], cells[:, w // 2 :]
        return torch.stack([left.reshape(-1), right.reshape(-1)])  # [2, L] ascending


@mukv.hookimpl
def mukv_register_extractors(register):
    register("halves", HalvesExtractor)


if __name__ == "__main__":
    import sys

    mukv.register_plugin(sys.modules[__name__], name="halves")
    levels = [
        {"name": "half", "extractor": "halves", "keep_ratio": 0.1, "top_k": 16},
        {"name": "segment", "extractor": "segment", "frames": 4, "keep_ratio": 0.8,
         "alpha": 0.8, "top_k": 4},
    ]
    with mukv.Session(model="tiny-llava-ov", config={"levels": levels}) as session:
        session.feed(torch.randint(0, 255, (8, 64, 64, 3), dtype=torch.uint8))
        # half: 16 blocks of 9 kept tokens each; segment: 2 blocks
        print(session.stats()["levels"])
    mukv.unregister_plugin(sys.modules[__name__])
