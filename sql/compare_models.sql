-- purpose: NIMA vs MPEMD per aspect-ratio bin (and all): MAEs, MAE decrease, its ratio to the typical bin's, MSE/LCC/SRCC
-- param: nima_version VARCHAR (required) model version of the baseline's predictions
-- param: mpemd_version VARCHAR (required) model version of the MPEMD predictions
-- param: nima_model VARCHAR = NULL  model column of the baseline set (NULL: any)
-- param: nima_patch_mode VARCHAR = NULL  patch mode of the baseline set (NULL: any)
-- param: nima_n_patches INTEGER = NULL  patch count of the baseline set (NULL: any)
-- param: mpemd_model VARCHAR = NULL  model column of the MPEMD set (NULL: any)
-- param: mpemd_patch_mode VARCHAR = NULL  patch mode of the MPEMD set (NULL: any)
-- param: mpemd_n_patches INTEGER = NULL  patch count of the MPEMD set (NULL: any)
-- param: split VARCHAR = 'test'  manifest split to compare on (NULL: every split)
-- param: typical_bin VARCHAR = '0.6-0.8'  the bin whose MAE decrease is the unit of decrease_vs_typical
--
-- Only images scored by both sets count, so the two columns of a row are over the same images.
WITH paired AS (
    SELECT a.bin, a.bin_order, a.true_score, a.pred_score AS nima_score, b.pred_score AS mpemd_score
    FROM scored($nima_version, $nima_model, $nima_patch_mode, $nima_n_patches, $split) AS a
    JOIN scored($mpemd_version, $mpemd_model, $mpemd_patch_mode, $mpemd_n_patches, $split) AS b
        ON a.image_id = b.image_id
    WHERE a.true_score IS NOT NULL AND a.pred_score IS NOT NULL AND b.pred_score IS NOT NULL
),
-- Each bin and all rows (rows outside every bin count in "all" only) in one aggregation.
stats AS (
    SELECT CASE WHEN grouping(bin) = 1 THEN 'all' ELSE bin END AS grp,
        count(*) AS n,
        avg(abs(nima_score - true_score)) AS nima_mae,
        avg(abs(mpemd_score - true_score)) AS mpemd_mae,
        avg((nima_score - true_score) ^ 2) AS nima_mse,
        avg((mpemd_score - true_score) ^ 2) AS mpemd_mse,
        lcc(nima_score, true_score) AS nima_lcc,
        lcc(mpemd_score, true_score) AS mpemd_lcc
    FROM paired
    GROUP BY GROUPING SETS ((bin), ())
    HAVING grouping(bin) = 1 OR bin IS NOT NULL
),
-- SRCC per bin and overall: the srcc_by_bin macro of views.sql (average ranks, one sort per column).
-- (bins by their integer bin_order: a cheaper sort key than the label; the macro's all row has bin NULL)
nima_pairs AS (SELECT bin_order AS bin, nima_score AS x, true_score AS y FROM paired),
mpemd_pairs AS (SELECT bin_order AS bin, mpemd_score AS x, true_score AS y FROM paired),
groups AS (
    SELECT bin AS grp, lo, hi, bin_order, bin_order AS code FROM aspect_bins
    UNION ALL
    SELECT 'all', NULL, NULL, (SELECT coalesce(max(bin_order), 0) + 1 FROM aspect_bins), NULL
),
typical AS (
    SELECT nima_mae - mpemd_mae AS decrease FROM stats WHERE grp = $typical_bin
)
SELECT g.grp AS bin, g.lo, g.hi, coalesce(s.n, 0) AS n,
    s.nima_mae, s.mpemd_mae,
    s.nima_mae - s.mpemd_mae AS mae_decrease,
    (s.nima_mae - s.mpemd_mae) / nullif(s.nima_mae, 0) AS relative_decrease,
    (s.nima_mae - s.mpemd_mae) / nullif((SELECT decrease FROM typical), 0) AS decrease_vs_typical,
    s.nima_mse, s.mpemd_mse,
    -- lcc (views.sql) is NULL where undefined: fewer than 2 images or a (near-)constant side.
    s.nima_lcc,
    s.mpemd_lcc,
    rn.srcc AS nima_srcc,
    rm.srcc AS mpemd_srcc
FROM groups AS g
LEFT JOIN stats AS s ON s.grp = g.grp
LEFT JOIN srcc_by_bin(nima_pairs) AS rn ON rn.bin IS NOT DISTINCT FROM g.code
LEFT JOIN srcc_by_bin(mpemd_pairs) AS rm ON rm.bin IS NOT DISTINCT FROM g.code
ORDER BY g.bin_order;
