-- purpose: per aspect-ratio bin (and all): n, MAE, MSE, RMSE, LCC, SRCC, accuracy at 5 of one prediction set
-- param: model_version VARCHAR (required) the checkpoint hash whose predictions to judge
-- param: model VARCHAR = NULL  nima or mpemd (NULL: any)
-- param: patch_mode VARCHAR = NULL  warp, random or grid (NULL: any)
-- param: n_patches INTEGER = NULL  patches per image (NULL: any)
-- param: split VARCHAR = 'test'  manifest split to judge on (NULL: every split)
-- param: threshold DOUBLE = 5.0  a score above it is "high" for the accuracy
-- param: min_n INTEGER = 10  bins with fewer images get a caveat: LCC/SRCC of 2 images is always +-1
WITH rows AS (
    SELECT bin, pred_score, true_score
    FROM scored($model_version, $model, $patch_mode, $n_patches, $split)
    WHERE pred_score IS NOT NULL AND true_score IS NOT NULL
),
-- Every row twice: once in its bin, once in "all" (rows outside every bin only there).
grouped AS (
    SELECT bin AS grp, pred_score, true_score FROM rows WHERE bin IS NOT NULL
    UNION ALL
    SELECT 'all', pred_score, true_score FROM rows
),
-- SRCC is LCC of ranks; ties get their average rank (as scipy.stats.rankdata): the mean of the
-- first tie's rank and the count up to the last tie (the default RANGE frame includes peers), one sort.
ranked AS (
    SELECT grp, pred_score, true_score,
        (rank() OVER by_pred + count(*) OVER by_pred) / 2.0 AS pred_rank,
        (rank() OVER by_true + count(*) OVER by_true) / 2.0 AS true_rank
    FROM grouped
    WINDOW by_pred AS (PARTITION BY grp ORDER BY pred_score),
        by_true AS (PARTITION BY grp ORDER BY true_score)
),
stats AS (
    SELECT grp,
        count(*) AS n,
        avg(abs(pred_score - true_score)) AS mae,
        avg((pred_score - true_score) ^ 2) AS mse,
        CASE WHEN count(*) >= 2 THEN corr(pred_score, true_score) END AS lcc,
        CASE WHEN count(*) >= 2 THEN corr(pred_rank, true_rank) END AS srcc,
        avg(CASE WHEN (pred_score > $threshold) = (true_score > $threshold) THEN 1.0 ELSE 0.0 END) AS accuracy
    FROM ranked
    GROUP BY grp
),
groups AS (
    SELECT bin AS grp, lo, hi, bin_order FROM aspect_bins
    UNION ALL
    SELECT 'all', NULL, NULL, (SELECT coalesce(max(bin_order), 0) + 1 FROM aspect_bins)
)
SELECT g.grp AS bin, g.lo, g.hi, coalesce(s.n, 0) AS n, s.mae, s.mse, sqrt(s.mse) AS rmse,
    -- corr of a constant side is NaN; report it as NULL like every other undefined value.
    CASE WHEN isnan(s.lcc) THEN NULL ELSE s.lcc END AS lcc,
    CASE WHEN isnan(s.srcc) THEN NULL ELSE s.srcc END AS srcc,
    s.accuracy,
    CASE WHEN s.n < $min_n THEN 'n < ' || $min_n || ': LCC/SRCC unreliable' END AS caveat
FROM groups AS g
LEFT JOIN stats AS s ON s.grp = g.grp
ORDER BY g.bin_order;
