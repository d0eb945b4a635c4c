"""Storage backends: where compressed blocks live (memory; disk tiers)."""
