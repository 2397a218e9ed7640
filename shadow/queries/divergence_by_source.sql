-- Divergence by where the frames came from: per pair and source, frames, mean score and the 4 s errors. A frame's
-- source is its `source:<name>` tag (`flywheel import` tags every imported frame with its format: ros2, waymo, av2,
-- nuplan, mcap); frames streamed by vehicles without such a tag count as `fleet`.
--
-- @param pair VARCHAR = '' only this pair id ('' = every pair)
SELECT pair,
       coalesce(regexp_replace(list_filter(tags, lambda t: starts_with(t, 'source:'))[1], '^source:', ''),
                'fleet') AS source,
       count(*) AS frames, avg(score) AS mean_score, max(score) AS max_score, avg(ade_4s) AS mean_ade_4s,
       avg(fde_4s) AS mean_fde_4s, avg(miss_4s::INT) AS miss_rate_4s, avg(maneuver_disagree::INT) AS disagree_rate
FROM divergences
WHERE ($pair = '' OR pair = $pair)
GROUP BY ALL
ORDER BY pair, mean_score DESC, source
