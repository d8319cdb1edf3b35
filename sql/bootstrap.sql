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
-- The steps are macros of views.sql (bootstrap_pairs, bootstrap_statistics, bootstrap_intervals); this file
-- runs every resample at once. `mpemd sql bootstrap` and tasks.analysis.sql.run_query run the same steps with
-- the resamples in batches of at most MPEMD_BOOTSTRAP_DRAWS draws (tasks/analysis/bootstrap_sql.py): the same answer.
WITH paired AS MATERIALIZED (
    FROM bootstrap_pairs($baseline_version, $baseline_model, $baseline_patch_mode, $baseline_n_patches,
                         $candidate_version, $candidate_model, $candidate_patch_mode, $candidate_n_patches, $split)
),
stats AS (FROM bootstrap_statistics('paired', $seed, $typical_bin, -1, $n_resamples))
FROM bootstrap_intervals('paired', 'stats', $n_resamples, $level, $min_n);
