-- purpose: per aspect-ratio bin (and all): n, MAE, MSE, RMSE, LCC, SRCC, accuracy at 5 of one prediction set
-- param: model_version VARCHAR (required) the checkpoint hash whose predictions to judge
-- param: model VARCHAR = NULL  nima or mpemd (NULL: any)
-- param: patch_mode VARCHAR = NULL  warp, random or grid (NULL: any)
-- param: n_patches INTEGER = NULL  patches per image (NULL: any)
-- param: split VARCHAR = 'test'  manifest split to judge on (NULL: every split)
-- param: threshold DOUBLE = 5.0  a score above it is "high" for the accuracy
-- param: min_n INTEGER = 10  bins with fewer images get a caveat: LCC/SRCC of 2 images is always +-1
--
-- Bins go by their integer bin_order (the bin_errors macro's all row has bin NULL; rows outside every
-- bin count in "all" only) and get their labels at the end. As a USMALLINT (check_bin_edges allows at
-- most 65,535 bins): the SRCC sort by (bin, x) carries 2 bytes of it, not 4 (bench_sql's 5 M rows, in
-- process, 10 alternations: median 2.16 s / 4.01 CPU-s against 2.25 s / 4.20 with an INTEGER).
WITH pairs AS (
    SELECT bin_order::USMALLINT AS bin, pred_score AS x, true_score AS y
    FROM scored($model_version, $model, $patch_mode, $n_patches, $split)
    WHERE pred_score IS NOT NULL AND true_score IS NOT NULL
),
groups AS (  -- grp: the bin_order of a bin, NULL for all
    SELECT bin AS label, lo, hi, bin_order AS grp, bin_order FROM aspect_bins
    UNION ALL
    SELECT 'all', NULL, NULL, NULL, (SELECT coalesce(max(bin_order), 0) + 1 FROM aspect_bins)
)
SELECT g.label AS bin, g.lo, g.hi, coalesce(s.n, 0) AS n, s.mae, s.mse, sqrt(s.mse) AS rmse,
    s.lcc,  -- lcc and srcc are NULL where undefined: fewer than 2 images or a (near-)constant side
    s.srcc,
    s.accuracy,
    CASE WHEN s.n < $min_n THEN 'n < ' || $min_n || ': LCC/SRCC unreliable' END AS caveat
FROM groups AS g
LEFT JOIN bin_errors(pairs, $threshold) AS s ON s.bin IS NOT DISTINCT FROM g.grp
ORDER BY g.bin_order;
