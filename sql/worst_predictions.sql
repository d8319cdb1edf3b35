-- purpose: the largest absolute errors of one prediction set, with uri and aspect ratio, for inspection
-- param: model_version VARCHAR (required) the checkpoint hash whose predictions to judge
-- param: model VARCHAR = NULL  nima or mpemd (NULL: any)
-- param: patch_mode VARCHAR = NULL  warp, random or grid (NULL: any)
-- param: n_patches INTEGER = NULL  patches per image (NULL: any)
-- param: split VARCHAR = 'test'  manifest split (NULL: every split)
-- param: bin VARCHAR = NULL  only this aspect-ratio bin, e.g. '1.6-inf' (NULL: all)
-- param: limit BIGINT = 20  how many rows
SELECT image_id, uri, aspect_ratio, bin, true_score, pred_score, error, abs(error) AS abs_error,
    model, patch_mode, n_patches, date
FROM scored($model_version, $model, $patch_mode, $n_patches, $split)
WHERE error IS NOT NULL AND ($bin IS NULL OR bin = $bin)
ORDER BY abs(error) DESC, image_id
LIMIT $limit;
