-- purpose: the prediction sets on hand: model version, model, patch mode and count, with rows, images and dates
-- param: model_version VARCHAR = NULL  only this model version (NULL: every version)
SELECT model_version, model, patch_mode, n_patches,
    count(*) AS n_rows,
    count(*) FILTER (WHERE status = 'ok') AS n_ok,
    count(DISTINCT coalesce(CAST(image_id AS VARCHAR), uri)) FILTER (WHERE status = 'ok') AS n_images,
    min(date) AS first_date, max(date) AS last_date
FROM predictions
WHERE $model_version IS NULL OR model_version = $model_version
GROUP BY ALL
ORDER BY model_version, model, patch_mode, n_patches;
