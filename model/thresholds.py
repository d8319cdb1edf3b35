"""Numbers of METHOD.md's metrics that the numpy metrics (``model.metrics``) and the DuckDB queries
(``tasks.analysis.sql``) share. Plain Python: ``mpemd sql`` imports this without numpy."""

HIGH_SCORE_THRESHOLD = 5.0  # a score above it is "high" (the binary accuracy of METHOD.md)
# Relative spread under which a vector counts as constant: a few float32 ulps (eps = 1.19e-7).
CONSTANT_RTOL = 1e-6
