"""Compression for target chips: `targets` (chip profiles, shipped in `profiles/`), `passes/` (prune, export,
quantize, numeric rules, accuracy-aware fallback, roofline estimate, verification) and `workflow` (the passes in
order for each chip, with measured CPU latency)."""
