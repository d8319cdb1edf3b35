-- purpose: per image, the true score and both sets' predictions (a stable sample, for scatter plots)
-- param: nima_version VARCHAR (required) model version of the baseline's predictions
-- param: mpemd_version VARCHAR (required) model version of the MPEMD predictions
-- param: nima_model VARCHAR = NULL  model column of the baseline set (NULL: any)
-- param: nima_patch_mode VARCHAR = NULL  patch mode of the baseline set (NULL: any)
-- param: nima_n_patches INTEGER = NULL  patch count of the baseline set (NULL: any)
-- param: mpemd_model VARCHAR = NULL  model column of the MPEMD set (NULL: any)
-- param: mpemd_patch_mode VARCHAR = NULL  patch mode of the MPEMD set (NULL: any)
-- param: mpemd_n_patches INTEGER = NULL  patch count of the MPEMD set (NULL: any)
-- param: split VARCHAR = 'test'  manifest split (NULL: every split)
-- param: limit BIGINT = 5000  most rows to return; the sample is the same on every run
SELECT a.image_id, a.uri, a.aspect_ratio, a.bin, a.true_score,
    a.pred_score AS nima_score, b.pred_score AS mpemd_score
FROM scored($nima_version, $nima_model, $nima_patch_mode, $nima_n_patches, $split) AS a
JOIN scored($mpemd_version, $mpemd_model, $mpemd_patch_mode, $mpemd_n_patches, $split) AS b
    ON a.image_id = b.image_id
ORDER BY hash(a.image_id), a.image_id
LIMIT $limit;
