"""Built-in plugins of mukv, installed as ``mukv.plugins``: each submodule is registered
through the ``mukv`` entry-point group, exactly as a third-party plugin would be."""
