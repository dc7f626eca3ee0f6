"""Where clips start and end: fixed-stride spans and shot detection
(TransNetV2, the content detector), the rules that turn per-frame transition
scores into spans, the low-resolution decode they share, and cut metrics."""
