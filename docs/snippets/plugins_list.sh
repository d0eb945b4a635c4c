# Every registered component, the plugin that registered it, and its package.
mukv plugins
# Only scorers; --json for tools.
mukv plugins --role scorers
# Load only some entry points (mukv's built-ins are entry points too).
MUKV_PLUGINS=extractors,scorers,compressors,retrievers,models,policies \
    mukv plugins --role scorers
