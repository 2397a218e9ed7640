"""Batch shadow replay over the lake: `replay` walks the frames files a pair has not covered, `frames_index` reads what they need."""
