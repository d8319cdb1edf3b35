-- purpose: paired bootstrap of a candidate set against a baseline set on the same images: intervals of each bin's MAE decrease, the pooled typical/unusual decreases (and their ratio when defined), and MSE/LCC/SRCC differences
-- param: baseline_version VARCHAR (required) model version of the baseline predictions (any set, e.g. nima_equal_budget)
-- param: candidate_version VARCHAR (required) model version of the candidate predictions (any set, e.g. mpemd_ada_random)
-- param: baseline_model VARCHAR = NULL  model column of the baseline set (NULL: any)
-- param: baseline_patch_mode VARCHAR = NULL  patch mode of the baseline set (NULL: any)
-- param: baseline_n_patches INTEGER = NULL  patch count of the baseline set (NULL: any)
-- param: candidate_model VARCHAR = NULL  model column of the candidate set (NULL: any)
-- param: candidate_patch_mode VARCHAR = NULL  patch mode of the candidate set (NULL: any)
-- param: candidate_n_patches INTEGER = NULL  patch count of the candidate set (NULL: any)
-- param: split VARCHAR = 'test'  manifest split (NULL: every split)
-- param: typical_bin VARCHAR = '0.6-0.8'  the bin whose MAE decrease is the unit of the ratio
-- param: n_resamples INTEGER = 2000  bootstrap resamples of the images (with replacement)
-- param: seed INTEGER = 0  seed of the resamples: the same seed gives the same intervals
-- param: level DOUBLE = 0.95  coverage of the percentile intervals
-- param: min_n INTEGER = 5  a bin of fewer images gets no interval (a bootstrap cannot judge it)
--
-- Every statistic favours the candidate when > 0: MAE/MSE decreases are baseline - candidate, LCC/SRCC
-- gains candidate - baseline. Each resample draws n images with replacement (hash of seed, resample,
-- draw) and recomputes every statistic for BOTH sets on that same draw (paired). `significant` is true
-- when the interval excludes zero; the verdict then says which side it favours, else "not significant".
-- unusual_over_typical is a ratio of pooled decreases, NULL unless the typical decrease is significant.
-- tasks/analysis/bootstrap.py is the same method in numpy (its own random draws: intervals agree to Monte-Carlo error).
WITH paired AS (
    SELECT row_number() OVER (ORDER BY a.image_id) - 1 AS i, a.bin, a.true_score AS t,
        a.pred_score AS pa, b.pred_score AS pb
    FROM scored($baseline_version, $baseline_model, $baseline_patch_mode, $baseline_n_patches, $split) AS a
    JOIN scored($candidate_version, $candidate_model, $candidate_patch_mode, $candidate_n_patches, $split) AS b
        ON a.image_id = b.image_id
    WHERE a.true_score IS NOT NULL
),
size AS (SELECT count(*) AS n FROM paired),
-- resample -1 is the data itself; 0 .. n_resamples-1 are the bootstrap draws
draws AS (
    SELECT -1 AS r, i FROM paired
    UNION ALL
    SELECT r, CAST(hash($seed, r, j) % n AS BIGINT) AS i
    FROM (SELECT r.range AS r, unnest(range(size.n)) AS j FROM range(0, $n_resamples) AS r, size)
    CROSS JOIN size
),
drawn AS (
    SELECT d.r, p.bin, p.t, p.pa, p.pb,
        abs(p.pa - p.t) - abs(p.pb - p.t) AS mae_dec,
        (p.pa - p.t) ^ 2 - (p.pb - p.t) ^ 2 AS mse_dec
    FROM draws AS d JOIN paired AS p ON p.i = d.i
),
-- Doubled average ranks within each resample (ties averaged, as scipy.stats.rankdata; a correlation
-- ignores the scale), as srcc_by_bin ranks: the predictions (nearly no ties) by rank() + the count up
-- to their ties (one sort each); the ground truth (vote means: few values) from its counts per
-- resample and value, summed over the sorted values, joined back (no sort of every drawn row).
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
per_resample AS (
    SELECT r, 'mae_decrease' AS statistic, bin, avg(mae_dec) AS value FROM drawn WHERE bin IS NOT NULL GROUP BY r, bin
    UNION ALL
    SELECT r, 'mae_decrease', 'all', avg(mae_dec) FROM drawn GROUP BY r
    UNION ALL
    SELECT r, 'mse_decrease', 'all', avg(mse_dec) FROM drawn GROUP BY r
    UNION ALL
    SELECT r, 'typical', NULL, avg(mae_dec) FILTER (WHERE bin = $typical_bin) FROM drawn GROUP BY r
    UNION ALL
    SELECT r, 'unusual', NULL, avg(mae_dec) FILTER (WHERE bin <> $typical_bin) FROM drawn GROUP BY r
    UNION ALL
    SELECT r, 'unusual_minus_typical', NULL,
        avg(mae_dec) FILTER (WHERE bin <> $typical_bin) - avg(mae_dec) FILTER (WHERE bin = $typical_bin)
    FROM drawn GROUP BY r
    UNION ALL
    SELECT r, 'unusual_over_typical', NULL,
        avg(mae_dec) FILTER (WHERE bin <> $typical_bin) / nullif(avg(mae_dec) FILTER (WHERE bin = $typical_bin), 0)
    FROM drawn GROUP BY r
    UNION ALL
    -- lcc / defined_corr (views.sql): NULL where a side is constant (model.metrics' rule)
    SELECT r, 'lcc_gain', 'all', lcc(pb, t) - lcc(pa, t) FROM ranked GROUP BY r
    UNION ALL
    SELECT r, 'srcc_gain', 'all', defined_corr(rb, rt, pb, t) - defined_corr(ra, rt, pa, t) FROM ranked GROUP BY r
),
clean AS (  -- a ratio of 0/0 is NaN: undefined, like an empty bin
    SELECT r, statistic, bin, CASE WHEN isnan(value) THEN NULL ELSE value END AS value FROM per_resample
),
intervals AS (
    SELECT statistic, bin,
        any_value(value) FILTER (WHERE r = -1) AS estimate,
        quantile_cont(value, (1 - $level) / 2) FILTER (WHERE r >= 0) AS lo,
        quantile_cont(value, 1 - (1 - $level) / 2) FILTER (WHERE r >= 0) AS hi,
        count(value) FILTER (WHERE r >= 0) AS defined
    FROM clean GROUP BY statistic, bin
),
typical AS (SELECT lo > 0 OR hi < 0 AS significant FROM intervals WHERE statistic = 'typical'),
counts AS (
    SELECT bin, count(*) AS n FROM paired WHERE bin IS NOT NULL GROUP BY bin
    UNION ALL
    SELECT 'all', count(*) FROM paired
),
answer AS (
    SELECT s.statistic, s.bin, c.n, s.estimate,
        -- no interval over mostly undefined resamples, nor for a bin of a few images
        CASE WHEN s.defined >= $n_resamples / 2 AND coalesce(c.n, $min_n) >= $min_n THEN s.lo END AS lo,
        CASE WHEN s.defined >= $n_resamples / 2 AND coalesce(c.n, $min_n) >= $min_n THEN s.hi END AS hi
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
