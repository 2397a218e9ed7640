-- Divergence trend over time: per day and pair, frames replayed, mean score, mean ADE at 4 s, miss and maneuver
-- disagreement rates (from the divergence rollup).
--
-- @param pair VARCHAR = '' only this pair id ('' = every pair)
-- @param days INTEGER = 0 only the last N days that hold data (0 = every day)
WITH daily AS (
    SELECT date, pair, sum(frames)::BIGINT AS frames,
           sum(sum_score) / sum(frames) AS mean_score, sum(sum_ade_4s) / sum(frames) AS mean_ade_4s,
           sum(miss_4s) / sum(frames) AS miss_rate_4s, sum(disagree) / sum(frames) AS disagree_rate
    FROM divergence_summary
    WHERE $pair = '' OR pair = $pair
    GROUP BY date, pair
)
SELECT * FROM daily
WHERE $days = 0 OR date > (SELECT max(date) FROM daily) - $days
ORDER BY date, pair
