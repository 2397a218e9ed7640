-- Top divergent scenario windows per condition: for each condition (lighting, weather, road_type) and each of its
-- values, the scenario windows with the highest max_score, with what they failed. Where to look first.
--
-- @param limit INTEGER = 5 windows per condition value
-- @param pair VARCHAR = '' only this pair id, e.g. teacher-1.0__student-1.0 ('' = every pair)
WITH s AS (
    SELECT lighting, weather, road_type, max_score,
           {pair: pair, drive_id: drive_id, window_start_seq: window_start_seq, window_end_seq: window_end_seq,
            start_time: start_time, frames: frames, max_score: max_score, mean_score: mean_score,
            mean_ade_4s: mean_ade_4s, max_fde_4s: max_fde_4s, miss_rate_4s: miss_rate_4s,
            disagree_rate: disagree_rate, passed: passed, failed_criteria: failed_criteria} AS w,
           -- ties broken by drive, window and pair so that the answer does not depend on the scan order
           (max_score, drive_id, window_start_seq, pair) AS key
    FROM scenarios
    WHERE $pair = '' OR pair = $pair
), top AS (
    -- max_by(.., n) keeps the n best per group without sorting every window (a window function is 50x slower here)
    SELECT 'lighting' AS condition, lighting AS value, max_by(w, key, $limit) AS windows FROM s GROUP BY lighting
    UNION ALL
    SELECT 'weather', weather, max_by(w, key, $limit) FROM s GROUP BY weather
    UNION ALL
    SELECT 'road_type', road_type, max_by(w, key, $limit) FROM s GROUP BY road_type
), ranked AS (
    SELECT condition, value, generate_subscripts(windows, 1) AS rank, unnest(windows) AS w FROM top
)
SELECT condition, value, rank, w.pair AS pair, w.drive_id AS drive_id, w.window_start_seq AS window_start_seq,
       w.window_end_seq AS window_end_seq, w.start_time AS start_time, w.frames AS frames, w.max_score AS max_score,
       w.mean_score AS mean_score, w.mean_ade_4s AS mean_ade_4s, w.max_fde_4s AS max_fde_4s,
       w.miss_rate_4s AS miss_rate_4s, w.disagree_rate AS disagree_rate, w.passed AS passed,
       w.failed_criteria AS failed_criteria
FROM ranked
ORDER BY condition, value, rank
