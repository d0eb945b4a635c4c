"""The registry from Python: what is registered, by whom, how a name resolves."""

import mukv

registry = mukv.get_registry()
for role in ("scorers", "retrievers", "backends"):
    print(role, registry.names(role))

entry = registry.entries["retrievers"]["semi_hierarchical"]
print(entry.component.__name__, "registered by", entry.plugin, "from", entry.package)

try:
    mukv.Session(model="tiny-llava-ov", config={"retrieval": {"retriever": "nope"}})
except mukv.UnknownPluginError as error:
    # unknown retriever 'nope' (config field 'retrieval.retriever');
    # registered retrievers: all, cosine, ...
    print(error)
