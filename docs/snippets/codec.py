"""A KV codec: how stored KV is encoded. This one keeps float16 KV (half the bytes of float32, exact
for bfloat16 values that float16 can hold) and refuses values beyond float16's range."""

import tempfile

import torch

import mukv
from mukv.blocks import EncodedKV
from mukv.errors import InputError
from mukv.interfaces import KVCodec


class Float16Codec(KVCodec):
    """Rows: the block as float16, ``[Y, 2, H, K, D]``. Error: one rounding to float16."""

    def encode(self, kv: torch.Tensor) -> EncodedKV:  # kv [B, Y, 2, H, K, D], finite
        if kv.abs().amax() > 65504:
            raise InputError("KV beyond float16's range: use another codec")
        return EncodedKV(kv.to(torch.float16).contiguous(), tuple(kv.shape[1:]), kv.dtype)

    def decode(self, encoded: EncodedKV, device) -> torch.Tensor:  # -> [n, Y, 2, H, K, D]
        return encoded.rows.to(device=device, dtype=encoded.dtype)

    def row_layout(self, block_shape, dtype):  # optional: the default encodes a block of zeros
        return tuple(block_shape), torch.float16


@mukv.hookimpl
def mukv_register_codecs(register):
    register("float16", Float16Codec)


if __name__ == "__main__":
    import sys

    mukv.register_plugin(sys.modules[__name__], name="float16_codec")
    frames = torch.randint(0, 255, (8, 64, 64, 3), dtype=torch.uint8)
    model = mukv.Session(model="tiny-llava-ov").model  # float32 on the CPU
    for codec in ("none", "float16", "int8", {"name": "int4", "group_size": 8}):
        with mukv.Session(model=model, config={"kv_codec": codec}) as s:  # the memory backend
            s.feed(frames)
            print(f"{str(codec):38s} {s.stats()['bytes']:>9,} bytes of KV for 8 frames")
    with tempfile.TemporaryDirectory() as store:
        with mukv.Session(model=model, backend="lancedb", path=store, config={"kv_codec": "int4"}) as s:
            s.feed(frames)  # every array records its codec
        with mukv.Session.open(store, model=model, config={"kv_codec": "float16"}) as s:
            s.feed(frames)  # another codec: new blocks go to new arrays, old ones keep theirs
            s.backend.flush()
            print("frame arrays:", [(p.rel.rsplit("/", 1)[-1], p.codec.name) for p in s.backend.archive.parts("frame")])
            print("answer:", s.ask("what happened?", max_new_tokens=2).text)
    mukv.unregister_plugin(sys.modules[__name__])
