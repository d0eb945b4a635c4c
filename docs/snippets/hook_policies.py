"""mukv_register_policies: a named configuration, for Session(policy=...)."""

import mukv

PATCH = {"name": "patch", "extractor": "patch_raster", "tokens": 49, "alpha": 0.5}
FRAME = {"name": "frame", "extractor": "frame", "alpha": 0.7}
SEGMENT = {"name": "segment", "extractor": "segment", "frames": 4, "alpha": 0.8}


@mukv.hookimpl
def mukv_register_policies(register):
    # MuKV with half the retrieval budget at every level, assembled in time order
    register("mukv_half", {
        "levels": [
            {**PATCH, "keep_ratio": 0.1, "top_k": 10, "rerank_weight": 0.3},
            {**FRAME, "keep_ratio": 0.1, "top_k": 16, "rerank_weight": 0.3},
            {**SEGMENT, "keep_ratio": 0.8, "top_k": 6},
        ],
        "assembly": {"order": "time"},
    })


if __name__ == "__main__":
    import sys

    mukv.register_plugin(sys.modules[__name__], name="mukv_half")
    # overrides apply over the policy
    overrides = {"generation": {"max_new_tokens": 8}}
    config = mukv.MukvConfig.from_policy("mukv_half", **overrides)
    print([(lv.name, lv.top_k) for lv in config.levels], config.assembly.order,
          config.generation.max_new_tokens)
    with mukv.Session(model="tiny-llava-ov", policy="mukv_half") as session:
        print(session.config.level("segment").top_k)
    mukv.unregister_plugin(sys.modules[__name__])
