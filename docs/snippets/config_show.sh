# The configuration a command would use, and where every value comes from:
# mukv's defaults, the model's, the policy's, the user file, MUKV_* variables, the command line.
MUKV_CONFIG__GENERATION__MAX_NEW_TOKENS=8 mukv config show --policy mukv_time \
    --config '{"retrieval": {"retriever": {"name": "cosine"}}}'
# The same as JSON, for tools.
mukv config show --json --policy '{"name": "rekv", "top_k": 32}'
