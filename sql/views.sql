-- purpose: name the data: views manifests, rejected, predictions and macros prediction_set(), scored(), lcc(), bin_errors(), srcc_by_bin()
--
-- Run once per connection (``tasks.analysis.sql.connect`` does). The file lists come from variables, so the
-- same file works from a plain ``duckdb`` shell, locally or on S3 (through a registered fsspec filesystem):
--   SET VARIABLE manifest_files = ['/data/manifests/train.parquet', '/data/manifests/test.parquet'];
--   SET VARIABLE rejected_files = '/data/manifests/rejected.parquet';
--   SET VARIABLE prediction_files = (SELECT list(file) FROM glob('/data/predictions/*/*/*.parquet'));
--   (a list: prediction_set() keeps only its version's folder of it)
--   SET VARIABLE constant_rtol = 1e-6;   -- model.metrics.CONSTANT_RTOL (tasks.analysis.sql.connect sets it from there)
--   CREATE TABLE aspect_bins ...   (see sql/README.md)
--   .read sql/views.sql
-- aspect_bins (bin, lo, hi, bin_order; half-open [lo, hi)) is the bins parameter table that every
-- per-bin query joins; mpemd builds it from model.metrics.ASPECT_BIN_EDGES unless told other edges.

CREATE OR REPLACE VIEW manifests AS
SELECT * FROM read_parquet(getvariable('manifest_files'), union_by_name = true);

CREATE OR REPLACE VIEW rejected AS
SELECT * FROM read_parquet(getvariable('rejected_files'), union_by_name = true);

-- model_version and date live in the Hive path only; typed here so an all-digit hash stays text.
-- union_by_name reads every file's schema at each bind and costs each scan more (5,000 shard files: ~0.5
-- CPU-s a bind); tasks.analysis.sql.connect sets prediction_union = false when it found one schema in every file.
CREATE OR REPLACE VIEW predictions AS
SELECT * FROM read_parquet(getvariable('prediction_files'),
                           union_by_name = coalesce(getvariable('prediction_union'), true),
                           hive_partitioning = true, hive_types = {'model_version': VARCHAR, 'date': DATE});

-- The files of one model version only (its model_version=<version>/ folders): a version's queries open
-- none of the others' files (the predictions view's model_version filter still reads every file's
-- schema at bind time, and opens files the pruning cannot see through a prepared parameter). No file
-- of that version: the whole list, which the model_version filter then empties.
CREATE OR REPLACE MACRO version_files(version) AS
coalesce(nullif(list_filter(getvariable('prediction_files'),
                            lambda f: contains(f, '/model_version=' || version || '/')), []),
         getvariable('prediction_files'));

-- Each row also carries where it lies: file_position (its file's index in the list) and row_position
-- (its row in that file), so a second pass over a few images can read only the files holding them.
CREATE OR REPLACE MACRO predictions_of(version) AS TABLE
SELECT *, file_index AS file_position, file_row_number AS row_position
FROM read_parquet(version_files(version),
                  union_by_name = coalesce(getvariable('prediction_union'), true), hive_partitioning = true,
                  -- type names as strings: a bare DATE would bind to a column of a joined table
                  hive_types = {'model_version': 'VARCHAR', 'date': 'DATE'});

-- A row's place in the order "latest first", in one HUGEINT, so a plain max keeps it (a fixed-size state):
-- its scored_at in microseconds (NULL above every time, as the whole-key ORDER BY ... DESC below puts it)
-- times 2^63, plus its position (file_position * 2^31 + row_position: below 2^32 files, 2^31 rows a
-- file), counted from the end when from_end. The max over an image's rows of both: the last and the
-- first position among its rows of the greatest scored_at.
CREATE OR REPLACE MACRO place_of(scored_time, file_position, row_position, from_end) AS
coalesce(epoch_us(scored_time)::HUGEINT, 9223372036854775808) * 9223372036854775808
    + CASE WHEN from_end THEN 9223372036854775807 - (file_position::HUGEINT * 2147483648 + row_position)
           ELSE file_position::HUGEINT * 2147483648 + row_position END;
CREATE OR REPLACE MACRO position_of_place(place, from_end) AS  -- its low 63 bits (a time before 1970 too)
CASE WHEN from_end THEN 9223372036854775807 - (place & 9223372036854775807) ELSE place & 9223372036854775807 END;
CREATE OR REPLACE MACRO file_of_place(place, from_end) AS (position_of_place(place, from_end) >> 31)::BIGINT;

-- The ok rows of one model version, optionally narrowed by model, patch mode and patch count (NULL
-- keeps any), with their places.
CREATE OR REPLACE MACRO ok_predictions(version, model_name, mode, patches) AS TABLE
SELECT *
FROM predictions_of(version)
WHERE status = 'ok'
  AND model_version = version
  AND (model_name IS NULL OR model = model_name)
  AND (mode IS NULL OR patch_mode = mode)
  AND (patches IS NULL OR n_patches = patches);

-- Whether the images of split split_name are picked at the predictions' scan: for the splits in the
-- variable prefiltered_splits (tasks.analysis.read_plan.small_splits lists those whose manifest is at
-- most half the manifests' bytes; unset, as in a plain shell: none). Then a semi join on the split's
-- image_ids sits right above the scan, where DuckDB pushes it in as a filter, and the latest row is
-- found for that split's images only; scored()'s join on the split gives the same rows either way.
-- bench_sql's 5 M rows: val (10% of the images) 1.20-1.51 -> 0.68-0.71 s; test (90%) +10% with it, so
-- a big split keeps the join alone. DuckDB folds the constant test at planning (one branch planned).
CREATE OR REPLACE MACRO split_at_scan(split_name) AS
split_name IS NOT NULL AND coalesce(list_contains(getvariable('prefiltered_splits'), split_name), false);

-- ok_predictions, and with split_name (NULL: every image) only the images of that split where
-- split_at_scan says so. (DuckDB binds both branches, each a read_parquet of the version's files, before
-- it folds one away: tasks.analysis.sql's connections define this macro and prediction_set_of_images
-- without the branch their variables never take, tasks.analysis.read_plan.drop_unchosen_branches.)
CREATE OR REPLACE MACRO chosen_predictions(version, model_name, mode, patches, split_name := NULL) AS TABLE
SELECT * FROM ok_predictions(version, model_name, mode, patches)
WHERE NOT split_at_scan(split_name)
UNION ALL
SELECT * FROM ok_predictions(version, model_name, mode, patches)
WHERE split_at_scan(split_name) AND image_id IN (SELECT image_id FROM manifests WHERE split = split_name);

-- One prediction set: the chosen rows of one model version (split_name: of that split's images only,
-- for scored(); prediction_set itself keeps every image). An image scored more than once (several
-- dates, a changed file, or a loose filter matching several sets) counts once: its latest row, by
-- scored_at, then date, then (exact ties: two URIs of one image in one batch) the greatest model,
-- patch_mode, n_patches, uri. Rows without an image_id (images outside the manifests) are told apart by
-- their uri. Every column comes from the chosen row, NULLs included (arg_max_null: arg_max skips a NULL
-- value and would fill it from an older row, e.g. the etag of the file the latest row replaced).
-- prediction_set_of_images (below latest_by_place and latest_by_key, its two plans) is that set for the
-- images with an image_id. latest_by_place, cheaply (no sort of the history, one scan of the files for
-- nearly every image): one hash aggregate per image keeps the row of the greatest scored_at
-- (arg_max_null on one timestamp) and the first and last place of that scored_at. Where they are one
-- row, that row IS the latest by the whole key: every image of a nightly history, however long. Only
-- images with two rows at their latest time (two URIs in one batch) or a NULL scored_at go through the
-- whole ordering key, over their own rows, in a second scan of only the files between their first and
-- last place (DuckDB skips the others by the join's filter on file_position): one batch's file as a
-- rule, not all of them again. prediction_set adds the rows without an image_id, in a scan of their own
-- (scored() joins on image_id, so it reads prediction_set_of_images only: that scan cost 0.1 ms a file
-- even where every file's statistics say it holds no such row). Same answer as ordering every row by
-- the whole key. (Before: the two greatest scored_at, max(x, 2), and a second scan of every file for
-- the tied images, 20% of the query on AVA-like files and half of it over 5,000 shard files; earlier, a
-- second aggregate and four scans of the files.)
CREATE OR REPLACE MACRO latest_by_place(version, model_name, mode, patches, split_name := NULL) AS TABLE
WITH by_time AS (  -- one pass, fixed-size states: the row of the greatest scored_at, and where it lies
    SELECT image_id, arg_max_null(COLUMNS(* EXCLUDE (image_id, file_position, row_position)), scored_at),
        -- decided: one row holds the greatest scored_at (arg_max_null skips a NULL one, so does max)
        bool_and(scored_at IS NOT NULL) AND position_of_place(max(place_of(scored_at, file_position, row_position, false)), false)
            = position_of_place(max(place_of(scored_at, file_position, row_position, true)), true) AS decided,
        file_of_place(max(place_of(scored_at, file_position, row_position, true)), true) AS first_file,
        file_of_place(max(place_of(scored_at, file_position, row_position, false)), false) AS last_file
    FROM chosen_predictions(version, model_name, mode, patches, split_name := split_name)
    WHERE image_id IS NOT NULL
    GROUP BY image_id
)
SELECT * EXCLUDE (decided, first_file, last_file) FROM by_time WHERE decided
UNION ALL BY NAME
-- (no split_name here: the images come from by_time, already of the split; the file pushdown below
-- needs the scan right under this join, which a split's semi join would sit between)
SELECT c.* EXCLUDE (file_position, row_position) FROM chosen_predictions(version, model_name, mode, patches) AS c
-- one join on both keys: DuckDB then pushes the wanted files into the scan, which opens only those
SEMI JOIN (SELECT image_id, unnest(range(first_file, last_file + 1))::UBIGINT AS file_position
           FROM by_time WHERE NOT decided) AS u ON c.image_id = u.image_id AND c.file_position = u.file_position
-- the same image_id set again, alone: a one-key semi join is what DuckDB pushes into the scan as a Bloom
-- filter (the two-key join above pushes only min/max ranges: 4.5 M rows out of the scan on bench_sql's ties)
WHERE c.image_id IN (SELECT image_id FROM by_time WHERE NOT decided)
QUALIFY row_number() OVER (PARTITION BY image_id
                           ORDER BY (scored_at, date, model, patch_mode, n_patches, uri) DESC) = 1;

-- The same set in one pass, for a version of many small files (shard files a run left uncompacted):
-- the row of the greatest whole key, one arg_max per image over the key as a STRUCT (it orders as the
-- ORDER BY above, a NULL field above every value). Each image then holds a variable-size key (~70 bytes
-- of sort key) instead of fixed-size states: on a nightly history of big files +25% CPU and +60% DuckDB
-- buffers. But no second scan: over 5,008 files of 1,000 rows the tie pass opened 4,508 of them again
-- (~0.28 ms a file), more than the key costs (5 M rows: query 6.3-7.3 -> 5.4-5.9 CPU-s, buffers 0.9 -> 1.3 GB).
CREATE OR REPLACE MACRO latest_by_key(version, model_name, mode, patches, split_name := NULL) AS TABLE
SELECT image_id, arg_max_null(COLUMNS(* EXCLUDE (image_id, file_position, row_position)),
                              (scored_at, date, model, patch_mode, n_patches, uri))
FROM chosen_predictions(version, model_name, mode, patches, split_name := split_name)
WHERE image_id IS NOT NULL
GROUP BY image_id;

-- Which of the two: latest_by_key for the versions in the variable one_pass_versions (tasks.analysis.sql
-- lists those whose files average under tasks.analysis.read_plan.SMALL_FILE_ROWS rows and hold at most
-- the memory limit / MEMORY_PER_ROW rows: past that the key's aggregate slows), latest_by_place
-- otherwise (and from a plain duckdb shell, where the variable is unset). DuckDB folds the constant
-- test at planning, so only the chosen branch is planned and scans (but both are bound: see above).
CREATE OR REPLACE MACRO prediction_set_of_images(version, model_name, mode, patches, split_name := NULL) AS TABLE
SELECT * FROM latest_by_key(version, model_name, mode, patches, split_name := split_name)
WHERE list_contains(coalesce(getvariable('one_pass_versions'), []::VARCHAR[]), version)
UNION ALL BY NAME
SELECT * FROM latest_by_place(version, model_name, mode, patches, split_name := split_name)
WHERE NOT list_contains(coalesce(getvariable('one_pass_versions'), []::VARCHAR[]), version);

CREATE OR REPLACE MACRO prediction_set(version, model_name, mode, patches) AS TABLE
SELECT * FROM prediction_set_of_images(version, model_name, mode, patches)
UNION ALL BY NAME
SELECT * EXCLUDE (file_position, row_position) FROM chosen_predictions(version, model_name, mode, patches)
WHERE image_id IS NULL
QUALIFY row_number() OVER (PARTITION BY uri ORDER BY (scored_at, date, model, patch_mode, n_patches) DESC) = 1;

-- The aspect_bins row of a ratio (bins are half-open [lo, hi)): the bins sorted by lo, the count of
-- lower edges <= ratio is its position; the join checks [lo, hi), so a ratio in a gap or outside
-- every bin gets none. A lookup per row instead of a range join over all rows.
CREATE OR REPLACE MACRO bin_position(ratio) AS
len(list_filter((SELECT list(lo ORDER BY lo) FROM aspect_bins), lambda edge: edge <= ratio));

-- A prediction set joined to its ground truth (by image_id) and its aspect-ratio bin (from the
-- manifest's height/width; NULL outside every bin). split_name NULL keeps every split.
CREATE OR REPLACE MACRO scored(version, model_name, mode, patches, split_name) AS TABLE
SELECT
    p.uri, m.image_id, p.model_version, p.model, p.patch_mode, p.n_patches, p.date,
    m.split, m.aspect_ratio, b.bin, b.lo, b.hi, b.bin_order,
    p.score AS pred_score, m.score_mean AS true_score, p.score - m.score_mean AS error,
    p.score_std AS pred_std, m.score_std AS true_std
FROM prediction_set_of_images(version, model_name, mode, patches, split_name := split_name) AS p
-- the split filter inside: applied at the manifest's scan, before the join and the bin lookup
JOIN (SELECT * FROM manifests WHERE split_name IS NULL OR split = split_name) AS m ON m.image_id = p.image_id
LEFT JOIN (SELECT *, row_number() OVER (ORDER BY lo) AS position FROM aspect_bins) AS b
    ON b.position = bin_position(m.aspect_ratio) AND m.aspect_ratio >= b.lo AND m.aspect_ratio < b.hi;

-- One definition of "constant" with model.metrics.is_constant: the values' range within constant_rtol
-- (model.metrics.CONSTANT_RTOL, set by tasks.analysis.sql.connect) of max(1, their largest magnitude), so a
-- vector of float32 rounding noise counts as constant here too. An unset variable is an error, not NULL.
CREATE OR REPLACE MACRO near_constant(lo, hi) AS
hi - lo <= coalesce(getvariable('constant_rtol')::DOUBLE, error('SET VARIABLE constant_rtol first')::DOUBLE)
           * greatest(1.0, abs(lo), abs(hi));

-- Aggregate macros (use them as aggregates, over non-NULL pairs). corr(a, b) where it is defined as in
-- model.metrics: at least 2 pairs and neither x nor y near_constant, else NULL (DuckDB's corr gives NaN
-- only for an exactly constant side). lcc is model.metrics.pearson; bin_errors guards its ranks'
-- correlation by the constancy of the raw values, as model.metrics.spearman does before ranking.
CREATE OR REPLACE MACRO defined_corr(a, b, x, y) AS
CASE WHEN count(*) >= 2 AND NOT near_constant(min(x), max(x)) AND NOT near_constant(min(y), max(y))
     THEN nullif(corr(a, b), 'NaN'::DOUBLE) END;
CREATE OR REPLACE MACRO lcc(x, y) AS defined_corr(x, y, x, y);

-- The error table of ``pairs`` (a table or CTE name with columns bin, x, y: a prediction x of a truth y,
-- neither NULL) within each bin and over all its rows: one row per bin, and one with bin NULL for all
-- rows (rows whose bin is NULL count there only), with n, MAE, MSE, LCC, SRCC and the accuracy of
-- x > threshold as a guess of y > threshold. Give bin as an integer code (e.g. aspect_bins.bin_order):
-- it is a sort key, and an integer sorts at half the cost of a label.
-- SRCC is LCC of ranks; ties get their average rank (as scipy.stats.rankdata), here doubled (a
-- correlation ignores the scale). x (a model's output, nearly no ties): rank() + cume_dist() * n, the
-- first and the last position of its ties, from unpartitioned sorts: a row's position ORDER BY bin, x
-- is its rank in its bin plus the rows of the bins before it, a constant per bin that a correlation does
-- not see. y (the ground truth, vote means: few distinct values): from a count per (bin, value), running
-- sums over the sorted values (a sort of thousands, not of every row) in the bin and over all bins,
-- joined to the rows once, after the sorts. One pass then: one window (two sorts), one join, and one
-- aggregation for every column, whose per-bin states also make the overall one. LCC and SRCC are NULL
-- where undefined (defined_corr).
CREATE OR REPLACE MACRO bin_errors(pairs, threshold) AS TABLE
WITH counted AS (SELECT count(*) AS n FROM query_table(pairs)),
y_counts AS (SELECT bin, y, count(*) AS c FROM query_table(pairs) GROUP BY bin, y),
y_overall AS (
    SELECT y, 2 * sum(c) OVER (ORDER BY y ROWS UNBOUNDED PRECEDING) - c + 1 AS y_all
    FROM (SELECT y, sum(c) AS c FROM y_counts GROUP BY y)
),
y_ranks AS (  -- doubled average ranks of each value, in its bin and overall
    SELECT b.bin, b.y, 2 * sum(b.c) OVER (PARTITION BY b.bin ORDER BY b.y ROWS UNBOUNDED PRECEDING) - b.c + 1 AS y_bin,
        o.y_all
    FROM y_counts AS b JOIN y_overall AS o ON o.y = b.y
),
x_ranks AS (  -- the sorts carry bin, x and y only; the y ranks join afterwards
    SELECT p.bin, p.x, p.y,
        rank() OVER bin_x + cume_dist() OVER bin_x * counted.n AS x_bin,
        rank() OVER all_x + cume_dist() OVER all_x * counted.n AS x_all
    FROM query_table(pairs) AS p, counted
    WINDOW bin_x AS (ORDER BY p.bin, p.x), all_x AS (ORDER BY p.x)
),
ranked AS (
    SELECT xr.*, r.y_bin, r.y_all
    FROM x_ranks AS xr JOIN y_ranks AS r ON r.bin IS NOT DISTINCT FROM xr.bin AND r.y = xr.y
)
SELECT CASE WHEN grouping(bin) = 0 THEN bin END AS bin,
    count(*) AS n,
    avg(abs(x - y)) AS mae,
    avg((x - y) ^ 2) AS mse,
    lcc(x, y) AS lcc,
    CASE WHEN grouping(bin) = 0 THEN defined_corr(x_bin, y_bin, x, y) ELSE defined_corr(x_all, y_all, x, y) END
        AS srcc,
    avg(CASE WHEN (x > threshold) = (y > threshold) THEN 1.0 ELSE 0.0 END) AS accuracy
FROM ranked
GROUP BY GROUPING SETS ((bin), ())
HAVING grouping(bin) = 1 OR bin IS NOT NULL;

-- Spearman's rank correlation of x and y within each bin of ``pairs`` and over all its rows (bin NULL):
-- bin_errors' srcc column (DuckDB drops the aggregates nobody reads).
CREATE OR REPLACE MACRO srcc_by_bin(pairs) AS TABLE
SELECT bin, srcc FROM bin_errors(pairs, NULL);

-- The paired bootstrap of sql/bootstrap.sql in three steps, so that tasks/analysis/bootstrap_sql.py can
-- run the resamples a batch at a time (one batch holds its draws x images rows, sorted twice for the
-- SRCC ranks: all resamples at once met a 4 GB limit past 10^6 rows of history). Same SQL either way.
-- bootstrap_pairs: the images both sets scored (with a ground truth), numbered i = 0 .. n-1 by image_id.
CREATE OR REPLACE MACRO bootstrap_pairs(a_version, a_model, a_mode, a_patches, b_version, b_model, b_mode, b_patches,
                                        split_name) AS TABLE
SELECT row_number() OVER (ORDER BY a.image_id) - 1 AS i, a.bin, a.true_score AS t,
    a.pred_score AS pa, b.pred_score AS pb
FROM scored(a_version, a_model, a_mode, a_patches, split_name) AS a
JOIN scored(b_version, b_model, b_mode, b_patches, split_name) AS b ON a.image_id = b.image_id
WHERE a.true_score IS NOT NULL;

-- bootstrap_statistics: every statistic (r, statistic, bin, value) of resamples r_from .. r_to - 1 of
-- ``pairs`` (a table or CTE name: bootstrap_pairs' columns); r = -1 is the data itself, 0 .. are draws
-- of n images with replacement, image hash(seed, r, j) % n at draw j: a resample's draws do not depend on
-- the range it is computed in.
-- Doubled average ranks within each resample (ties averaged, as scipy.stats.rankdata; a correlation
-- ignores the scale), as srcc_by_bin ranks: the predictions (nearly no ties) by rank() + the count up
-- to their ties (one sort each); the ground truth (vote means: few values) from its counts per
-- resample and value, summed over the sorted values, joined back (no sort of every drawn row).
CREATE OR REPLACE MACRO bootstrap_statistics(pairs, seed, typical_bin, r_from, r_to) AS TABLE
WITH size AS (SELECT count(*) AS n FROM query_table(pairs)),
draws AS (
    SELECT -1 AS r, i FROM query_table(pairs) WHERE r_from < 0
    UNION ALL
    SELECT r, CAST(hash(seed, r, j) % n AS BIGINT) AS i
    FROM (SELECT r.range AS r, unnest(range(size.n)) AS j FROM range(greatest(r_from, 0), r_to) AS r, size)
    CROSS JOIN size
),
drawn AS (
    SELECT d.r, p.bin, p.t, p.pa, p.pb,
        abs(p.pa - p.t) - abs(p.pb - p.t) AS mae_dec,
        (p.pa - p.t) ^ 2 - (p.pb - p.t) ^ 2 AS mse_dec
    FROM draws AS d JOIN query_table(pairs) AS p ON p.i = d.i
),
t_ranks AS (
    SELECT r, t, 2 * sum(c) OVER (PARTITION BY r ORDER BY t ROWS UNBOUNDED PRECEDING) - c + 1 AS rt
    FROM (SELECT r, t, count(*) AS c FROM drawn GROUP BY r, t)
),
ranked AS (
    SELECT d.r, d.t, d.pa, d.pb, tr.rt,
        rank() OVER by_a + count(*) OVER by_a AS ra,
        rank() OVER by_b + count(*) OVER by_b AS rb
    FROM drawn AS d JOIN t_ranks AS tr ON tr.r = d.r AND tr.t = d.t
    WINDOW by_a AS (PARTITION BY d.r ORDER BY d.pa), by_b AS (PARTITION BY d.r ORDER BY d.pb)
),
by_resample AS (  -- one pass over the drawn rows for every statistic of a whole resample
    SELECT r, avg(mae_dec) AS mae_all, avg(mse_dec) AS mse_all,
        avg(mae_dec) FILTER (WHERE bin = typical_bin) AS typical,
        avg(mae_dec) FILTER (WHERE bin <> typical_bin) AS unusual
    FROM drawn GROUP BY r
),
gains AS (  -- lcc / defined_corr: NULL where a side is constant (model.metrics' rule)
    SELECT r, lcc(pb, t) - lcc(pa, t) AS lcc_gain, defined_corr(rb, rt, pb, t) - defined_corr(ra, rt, pa, t) AS srcc_gain
    FROM ranked GROUP BY r
),
per_resample AS (
    SELECT r, 'mae_decrease' AS statistic, bin, avg(mae_dec) AS value FROM drawn WHERE bin IS NOT NULL GROUP BY r, bin
    UNION ALL
    SELECT r, 'mae_decrease', 'all', mae_all FROM by_resample
    UNION ALL
    SELECT r, 'mse_decrease', 'all', mse_all FROM by_resample
    UNION ALL
    SELECT r, 'typical', NULL, typical FROM by_resample
    UNION ALL
    SELECT r, 'unusual', NULL, unusual FROM by_resample
    UNION ALL
    SELECT r, 'unusual_minus_typical', NULL, unusual - typical FROM by_resample
    UNION ALL
    SELECT r, 'unusual_over_typical', NULL, unusual / nullif(typical, 0) FROM by_resample
    UNION ALL
    SELECT r, 'lcc_gain', 'all', lcc_gain FROM gains
    UNION ALL
    SELECT r, 'srcc_gain', 'all', srcc_gain FROM gains
)
-- a ratio of 0/0 is NaN: undefined, like an empty bin
SELECT r, statistic, bin, CASE WHEN isnan(value) THEN NULL ELSE value END AS value FROM per_resample;

-- bootstrap_intervals: the answer of sql/bootstrap.sql from ``pairs`` and the statistics of resamples
-- -1 .. n_resamples - 1 in ``stats`` (table or CTE names): each statistic's estimate (r = -1), its
-- percentile interval over the resamples and the verdict.
CREATE OR REPLACE MACRO bootstrap_intervals(pairs, stats, n_resamples, level, min_n) AS TABLE
WITH intervals AS (
    SELECT statistic, bin,
        any_value(value) FILTER (WHERE r = -1) AS estimate,
        quantile_cont(value, (1 - level) / 2) FILTER (WHERE r >= 0) AS lo,
        quantile_cont(value, 1 - (1 - level) / 2) FILTER (WHERE r >= 0) AS hi,
        count(value) FILTER (WHERE r >= 0) AS defined
    FROM query_table(stats) GROUP BY statistic, bin
),
typical AS (SELECT lo > 0 OR hi < 0 AS significant FROM intervals WHERE statistic = 'typical'),
counts AS (
    SELECT bin, count(*) AS n FROM query_table(pairs) WHERE bin IS NOT NULL GROUP BY bin
    UNION ALL
    SELECT 'all', count(*) FROM query_table(pairs)
),
answer AS (
    SELECT s.statistic, s.bin, c.n, s.estimate,
        -- no interval over mostly undefined resamples, nor for a bin of a few images
        CASE WHEN s.defined >= n_resamples / 2 AND coalesce(c.n, min_n) >= min_n THEN s.lo END AS lo,
        CASE WHEN s.defined >= n_resamples / 2 AND coalesce(c.n, min_n) >= min_n THEN s.hi END AS hi
    FROM intervals AS s LEFT JOIN counts AS c ON c.bin = s.bin
    WHERE s.statistic <> 'unusual_over_typical' OR coalesce((SELECT significant FROM typical), false)
)
SELECT statistic, bin, n, estimate, lo, hi,
    coalesce(lo > 0 OR hi < 0, false) AS significant,
    CASE WHEN lo > 0 THEN 'significant, favours the candidate'
         WHEN hi < 0 THEN 'significant, favours the baseline'
         ELSE 'not significant' END AS verdict
FROM answer
ORDER BY CASE statistic WHEN 'mae_decrease' THEN 0 WHEN 'mse_decrease' THEN 1 WHEN 'lcc_gain' THEN 2
    WHEN 'srcc_gain' THEN 3 WHEN 'typical' THEN 4 WHEN 'unusual' THEN 5 WHEN 'unusual_minus_typical' THEN 6
    ELSE 7 END,
    (SELECT bin_order FROM aspect_bins AS ab WHERE ab.bin = answer.bin) NULLS LAST;

SELECT view_name AS name, 'view' AS kind FROM duckdb_views() WHERE NOT internal AND schema_name = 'main'
UNION ALL
SELECT DISTINCT function_name, 'macro' FROM duckdb_functions()
WHERE function_type = 'table_macro' AND schema_name = 'main' AND NOT internal
ORDER BY kind DESC, name;
