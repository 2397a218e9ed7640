-- Where teacher and student diverge: per pair and condition (road type, lighting, weather), frames, mean score and
-- its lift over the pair's mean across all conditions (lift 3 = three times the usual divergence), highest first.
--
-- @param pair VARCHAR = '' only this pair id ('' = every pair)
-- @param min_frames INTEGER = 1 leave out conditions with fewer frames
SELECT pair, road_type, lighting, weather, frames, mean_score,
       mean_score / (sum(mean_score * frames) OVER (PARTITION BY pair) / sum(frames) OVER (PARTITION BY pair)) AS lift,
       mean_ade_4s, mean_fde_4s, miss_rate_4s, disagree_rate, max_score
FROM divergence_by_condition
WHERE ($pair = '' OR pair = $pair)
QUALIFY frames >= $min_frames
ORDER BY lift DESC, frames, pair, road_type, lighting, weather
