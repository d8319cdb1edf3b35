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
-- Per bin and overall, each set's errors: the bin_errors macro of views.sql (bins by their integer
-- bin_order as a USMALLINT, a cheaper sort key than the label, as in errors_by_aspect_bin.sql; the macro's
-- all row has bin NULL, and rows outside every bin count there only). Both sets are over the same images,
-- so either's n is the row's n.
nima_pairs AS (SELECT bin_order::USMALLINT AS bin, nima_score AS x, true_score AS y FROM paired),
mpemd_pairs AS (SELECT bin_order::USMALLINT AS bin, mpemd_score AS x, true_score AS y FROM paired),
groups AS (
    SELECT bin AS grp, lo, hi, bin_order, bin_order AS code FROM aspect_bins
    UNION ALL
    SELECT 'all', NULL, NULL, (SELECT coalesce(max(bin_order), 0) + 1 FROM aspect_bins), NULL
),
by_bin AS (
    SELECT g.grp, g.lo, g.hi, g.bin_order, coalesce(a.n, 0) AS n,
        a.mae AS nima_mae, b.mae AS mpemd_mae, a.mse AS nima_mse, b.mse AS mpemd_mse,
        a.lcc AS nima_lcc, b.lcc AS mpemd_lcc, a.srcc AS nima_srcc, b.srcc AS mpemd_srcc
    FROM groups AS g
    LEFT JOIN bin_errors(nima_pairs, NULL) AS a ON a.bin IS NOT DISTINCT FROM g.code
    LEFT JOIN bin_errors(mpemd_pairs, NULL) AS b ON b.bin IS NOT DISTINCT FROM g.code
),
typical AS (
    SELECT nima_mae - mpemd_mae AS decrease FROM by_bin WHERE grp = $typical_bin
)
SELECT grp AS bin, lo, hi, n,
    nima_mae, mpemd_mae,
    nima_mae - mpemd_mae AS mae_decrease,
    (nima_mae - mpemd_mae) / nullif(nima_mae, 0) AS relative_decrease,
    (nima_mae - mpemd_mae) / nullif((SELECT decrease FROM typical), 0) AS decrease_vs_typical,
    nima_mse, mpemd_mse,
    -- LCC and SRCC are NULL where undefined: fewer than 2 images or a (near-)constant side.
    nima_lcc, mpemd_lcc,
    nima_srcc, mpemd_srcc
FROM by_bin
ORDER BY bin_order;
