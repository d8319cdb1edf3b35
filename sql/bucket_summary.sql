-- purpose: nightly scoring per model version, date and set: rows by status, score percentiles, images new that day
-- param: model_version VARCHAR = NULL  only this model version (NULL: every version)
-- param: since DATE = NULL  first date to show (NULL: all dates)
--
-- n_new counts the images (by image_id, else uri) whose first ok row in this set is on this date:
-- the row for today says how much of the bucket was newly scored tonight.
WITH p AS (
    SELECT *, coalesce(CAST(image_id AS VARCHAR), uri) AS image_key FROM predictions
    WHERE $model_version IS NULL OR model_version = $model_version
),
first_ok AS (
    SELECT model_version, model, patch_mode, n_patches, image_key, min(date) AS first_date
    FROM p WHERE status = 'ok'
    GROUP BY ALL
),
new_per_date AS (
    SELECT model_version, model, patch_mode, n_patches, first_date AS date, count(*) AS n_new
    FROM first_ok
    GROUP BY ALL
),
per_date AS (
    SELECT model_version, date, model, patch_mode, n_patches,
        count(*) AS n_rows,
        count(*) FILTER (WHERE status = 'ok') AS n_ok,
        count(*) FILTER (WHERE status = 'error') AS n_error,
        count(*) FILTER (WHERE status IS DISTINCT FROM 'ok' AND status IS DISTINCT FROM 'error') AS n_other,
        quantile_cont(score, 0.1) FILTER (WHERE status = 'ok') AS score_p10,
        quantile_cont(score, 0.5) FILTER (WHERE status = 'ok') AS score_p50,
        quantile_cont(score, 0.9) FILTER (WHERE status = 'ok') AS score_p90,
        avg(score) FILTER (WHERE status = 'ok') AS score_mean,
        mode(error) FILTER (WHERE status = 'error') AS top_error
    FROM p
    GROUP BY ALL
)
SELECT d.model_version, d.date, d.model, d.patch_mode, d.n_patches, d.n_rows, d.n_ok, d.n_error, d.n_other,
    coalesce(nw.n_new, 0) AS n_new, d.score_p10, d.score_p50, d.score_p90, d.score_mean, d.top_error
FROM per_date AS d
LEFT JOIN new_per_date AS nw
    ON nw.model_version = d.model_version AND nw.date = d.date
    AND nw.model IS NOT DISTINCT FROM d.model AND nw.patch_mode IS NOT DISTINCT FROM d.patch_mode
    AND nw.n_patches IS NOT DISTINCT FROM d.n_patches
WHERE $since IS NULL OR d.date >= $since
ORDER BY d.model_version, d.date, d.model, d.patch_mode, d.n_patches;
