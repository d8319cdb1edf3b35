-- purpose: histogram of manifest aspect ratios (height/width) in fine steps, each step with its analysis bin
-- param: split VARCHAR = NULL  manifest split (NULL: every split)
-- param: step DOUBLE = 0.05  width of a step
-- param: max_ratio DOUBLE = 2.5  ratios at or above it count in one last row [max_ratio, inf)
--
-- The same steps as the ingest histogram ({root}/stats/aspect_ratio_histogram.parquet).
WITH ratios AS (
    SELECT aspect_ratio FROM manifests
    WHERE ($split IS NULL OR split = $split) AND aspect_ratio >= 0 AND isfinite(aspect_ratio)
),
n_steps AS (SELECT CAST(round($max_ratio / $step) AS BIGINT) AS k),
steps AS (
    SELECT i, i * $step AS lo, CASE WHEN i < k THEN (i + 1) * $step ELSE 'inf'::DOUBLE END AS hi
    FROM n_steps, range(0, k + 1) AS t(i)
),
-- Rounding before floor keeps a ratio on an edge (0.6 / 0.05 = 11.999...) in the step it starts.
counted AS (
    SELECT least(CAST(floor(round(aspect_ratio / $step, 9)) AS BIGINT), (SELECT k FROM n_steps)) AS i,
        count(*) AS n
    FROM ratios
    GROUP BY ALL
)
SELECT s.lo, s.hi, coalesce(c.n, 0) AS n,
    coalesce(c.n, 0) / nullif((SELECT count(*) FROM ratios), 0) AS fraction,
    b.bin
FROM steps AS s
LEFT JOIN counted AS c ON c.i = s.i
LEFT JOIN aspect_bins AS b ON s.lo + $step / 2 >= b.lo AND s.lo + $step / 2 < b.hi
ORDER BY s.i;
