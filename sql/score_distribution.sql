-- purpose: score histograms over 1..10: true mean scores of a split and the predicted scores of each prediction set
-- param: split VARCHAR = 'test'  manifest split; predictions only of its images (NULL: all manifests, all predictions)
-- param: model_version VARCHAR = NULL  only this model version's predictions (NULL: every version)
-- param: step DOUBLE = 0.25  width of a bucket
WITH truth AS (
    SELECT image_id, score_mean FROM manifests WHERE $split IS NULL OR split = $split
),
scores AS (
    SELECT 'true' AS series, score_mean AS score FROM truth
    UNION ALL
    SELECT concat_ws(':', p.model, p.model_version, p.patch_mode, CAST(p.n_patches AS VARCHAR)), p.score
    FROM predictions AS p
    WHERE p.status = 'ok'
      AND ($model_version IS NULL OR p.model_version = $model_version)
      AND ($split IS NULL OR p.image_id IN (SELECT image_id FROM truth))
),
buckets AS (
    SELECT i, 1 + i * $step AS lo, 1 + (i + 1) * $step AS hi
    FROM range(0, CAST(ceil(round(9 / $step, 9)) AS BIGINT)) AS t(i)
),
-- Scores outside 1..10 land in the first or last bucket; rounding keeps edges in the bucket they start.
counted AS (
    SELECT series,
        greatest(0, least(CAST(floor(round((score - 1) / $step, 9)) AS BIGINT), (SELECT max(i) FROM buckets))) AS i,
        count(*) AS n
    FROM scores
    WHERE score IS NOT NULL AND isfinite(score)
    GROUP BY ALL
),
series AS (SELECT DISTINCT series FROM counted)
SELECT s.series, b.lo, b.hi, coalesce(c.n, 0) AS n,
    coalesce(c.n, 0) / sum(coalesce(c.n, 0)) OVER (PARTITION BY s.series) AS fraction
FROM series AS s
CROSS JOIN buckets AS b
LEFT JOIN counted AS c ON c.series = s.series AND c.i = b.i
ORDER BY s.series = 'true' DESC, s.series, b.i;
