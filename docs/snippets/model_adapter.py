"""A model adapter: how a Video-LLM turns frames into visual tokens.

The one abstract method is ``encode_frames(frames uint8 [n, H, W, 3]) -> [n, T, E]``;
prefill, the query vector and decoding come from ``mukv.model.HFVideoLLM``.
This adapter centre-crops frames to a square before LLaVA-OneVision's encoder
(which would otherwise stretch a 16:9 frame).
"""

import torch

import mukv
from mukv.plugins.models.llava_onevision import LlavaOnevisionAdapter
from mukv.plugins.models.llava_onevision import build_llava_onevision


class CroppingLlavaOnevision(LlavaOnevisionAdapter):
    @torch.inference_mode()
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        h, w = frames.shape[1:3]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = frames[:, top : top + side, left : left + side]
        return super().encode_frames(square)  # [n, 196, E]


def tiny_cropping(device="cpu", dtype=None):
    """A preset: builds the model without downloading anything (random weights)."""
    base = build_llava_onevision("tiny-llava-ov", device=device, dtype=dtype)
    name = "tiny-llava-ov-crop"
    return CroppingLlavaOnevision(base.model, base.tokenizer, name=name)


@mukv.hookimpl
def mukv_register_models(register):
    # a preset: a function (device, dtype) -> adapter
    register("tiny-llava-ov-crop", tiny_cropping)


if __name__ == "__main__":
    import sys

    mukv.register_plugin(sys.modules[__name__], name="cropping")
    wide = torch.randint(0, 255, (8, 72, 128, 3), dtype=torch.uint8)  # 16:9 frames
    with mukv.Session(model="tiny-llava-ov-crop") as session:
        session.feed(wide)
        tokens = session.model.encode_frames(wide[:1])
        print(type(session.model).__name__, tuple(tokens.shape))  # (1, 196, 64)

    # A checkpoint directory is loaded by the adapter class registered for the
    # "model_type" of its config.json: here the built-in LlavaOnevisionAdapter.
    # A new architecture registers its adapter class, with model_types, likewise.
    session.model.model.save_pretrained("tiny-checkpoint")
    session.model.tokenizer.save_pretrained("tiny-checkpoint")
    with mukv.Session(model="tiny-checkpoint") as session:
        print("loaded", session.model.name, "with", type(session.model).__name__)
    mukv.unregister_plugin(sys.modules[__name__])
