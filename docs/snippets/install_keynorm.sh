# From the repository root: install the example plugin next to mukv.
pip install -e examples/mukv-keynorm
