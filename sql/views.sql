-- purpose: name the data: views manifests, rejected, predictions and macros prediction_set(), scored()
--
-- Run once per connection (``tasks.sql.connect`` does). The file lists come from variables, so the
-- same file works from a plain ``duckdb`` shell, locally or on S3 (through a registered fsspec filesystem):
--   SET VARIABLE manifest_files = ['/data/manifests/train.parquet', '/data/manifests/test.parquet'];
--   SET VARIABLE rejected_files = '/data/manifests/rejected.parquet';
--   SET VARIABLE prediction_files = '/data/predictions/*/*/*.parquet';
--   CREATE TABLE aspect_bins ...   (see sql/README.md)
--   .read sql/views.sql
-- aspect_bins (bin, lo, hi, bin_order; half-open [lo, hi)) is the bins parameter table that every
-- per-bin query joins; mpemd builds it from model.metrics.ASPECT_BIN_EDGES unless told other edges.

CREATE OR REPLACE VIEW manifests AS
SELECT * FROM read_parquet(getvariable('manifest_files'), union_by_name = true);

CREATE OR REPLACE VIEW rejected AS
SELECT * FROM read_parquet(getvariable('rejected_files'), union_by_name = true);

-- model_version and date live in the Hive path only; typed here so an all-digit hash stays text.
CREATE OR REPLACE VIEW predictions AS
SELECT * FROM read_parquet(getvariable('prediction_files'), union_by_name = true, hive_partitioning = true,
                           hive_types = {'model_version': VARCHAR, 'date': DATE});

-- One prediction set: the ok rows of one model version, optionally narrowed by model, patch mode and
-- patch count (NULL keeps any). An image scored more than once (several dates, a changed file, or a
-- loose filter matching several sets) counts once: its latest row.
CREATE OR REPLACE MACRO prediction_set(version, model_name, mode, patches) AS TABLE
SELECT *
FROM predictions
WHERE status = 'ok'
  AND model_version = version
  AND (model_name IS NULL OR model = model_name)
  AND (mode IS NULL OR patch_mode = mode)
  AND (patches IS NULL OR n_patches = patches)
QUALIFY row_number() OVER (
    PARTITION BY image_id, CASE WHEN image_id IS NULL THEN uri END
    ORDER BY scored_at DESC, date DESC, model, patch_mode, n_patches, uri) = 1;

-- A prediction set joined to its ground truth (by image_id) and its aspect-ratio bin (from the
-- manifest's height/width; NULL outside every bin). split_name NULL keeps every split.
CREATE OR REPLACE MACRO scored(version, model_name, mode, patches, split_name) AS TABLE
SELECT
    p.uri, m.image_id, p.model_version, p.model, p.patch_mode, p.n_patches, p.date,
    m.split, m.aspect_ratio, b.bin, b.lo, b.hi, b.bin_order,
    p.score AS pred_score, m.score_mean AS true_score, p.score - m.score_mean AS error,
    p.score_std AS pred_std, m.score_std AS true_std
FROM prediction_set(version, model_name, mode, patches) AS p
JOIN manifests AS m ON m.image_id = p.image_id
LEFT JOIN aspect_bins AS b ON m.aspect_ratio >= b.lo AND m.aspect_ratio < b.hi
WHERE split_name IS NULL OR m.split = split_name;

SELECT view_name AS name, 'view' AS kind FROM duckdb_views() WHERE NOT internal AND schema_name = 'main'
UNION ALL
SELECT DISTINCT function_name, 'macro' FROM duckdb_functions()
WHERE function_type = 'table_macro' AND schema_name = 'main' AND NOT internal
ORDER BY kind DESC, name;
