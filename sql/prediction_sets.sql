-- purpose: the prediction sets on hand: model version, model, patch mode and count, with rows, images and dates
-- param: model_version VARCHAR = NULL  only this model version (NULL: every version)
-- An image is its image_id, or its uri where it has none (as prediction_set dedupes them). The distinct
-- counts key each row by one 64-bit hash of its set, not by the set's columns: their hash table holds
-- a row per (set, image) and, keyed by the strings, spilled past the 4 GB limit at 10^8 rows.
WITH keyed AS (
    SELECT model_version, model, patch_mode, n_patches, status, image_id, uri, date,
        hash(model_version, model, patch_mode, n_patches) AS set_key
    FROM predictions
    WHERE $model_version IS NULL OR model_version = $model_version
), sets AS (
    SELECT model_version, model, patch_mode, n_patches, set_key,
        count(*) AS n_rows,
        count(*) FILTER (WHERE status = 'ok') AS n_ok,
        min(date) AS first_date, max(date) AS last_date
    FROM keyed
    GROUP BY ALL
), ids AS (
    SELECT set_key, count(DISTINCT image_id) AS n FROM keyed WHERE status = 'ok' GROUP BY set_key
), uris AS (
    SELECT set_key, count(DISTINCT uri) AS n FROM keyed WHERE status = 'ok' AND image_id IS NULL GROUP BY set_key
)
SELECT s.model_version, s.model, s.patch_mode, s.n_patches, s.n_rows, s.n_ok,
    -- two sets on one hash would share their counts: refused, never merged
    CASE WHEN (SELECT count(DISTINCT set_key) = count(*) FROM sets) THEN coalesce(i.n, 0) + coalesce(u.n, 0)
         ELSE error('prediction_sets: two prediction sets share a hash key') END AS n_images,
    s.first_date, s.last_date
FROM sets AS s LEFT JOIN ids AS i USING (set_key) LEFT JOIN uris AS u USING (set_key)
ORDER BY s.model_version, s.model, s.patch_mode, s.n_patches;
