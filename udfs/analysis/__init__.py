"""Per-clip analysis: one decode per clip for motion scores and the frames the
model stages consume, aesthetic scoring, and the keep/drop filter columns."""
