-- purpose: per image of one prediction set: its bin, true score and predicted score (every image, for the bootstrap)
-- param: model_version VARCHAR (required) model version of the predictions
-- param: model VARCHAR = NULL  model column of the set (NULL: any)
-- param: patch_mode VARCHAR = NULL  patch mode of the set (NULL: any)
-- param: n_patches INTEGER = NULL  patch count of the set (NULL: any)
-- param: split VARCHAR = 'test'  manifest split (NULL: every split)
SELECT image_id, uri, aspect_ratio, bin, bin_order, true_score, pred_score
FROM scored($model_version, $model, $patch_mode, $n_patches, $split)
WHERE true_score IS NOT NULL
ORDER BY image_id;
