-- Pass rates per scenario type (road type) and condition (lighting, weather): scenario windows, pass rate and the
-- criterion failed most often, per pair.
--
-- @param pair VARCHAR = '' only this pair id ('' = every pair)
WITH s AS (
    SELECT * FROM scenarios WHERE $pair = '' OR pair = $pair
), failures AS (
    SELECT pair, road_type, lighting, weather, criterion, count(*) AS n
    FROM (SELECT pair, road_type, lighting, weather, unnest(failed_criteria) AS criterion FROM s)
    GROUP BY ALL
), top_failure AS (
    SELECT pair, road_type, lighting, weather, arg_max(criterion, n) AS top_failed_criterion
    FROM failures GROUP BY ALL
)
SELECT g.pair, g.road_type AS scenario_type, g.lighting, g.weather, g.windows, g.frames, g.pass_rate,
       g.mean_score, t.top_failed_criterion
FROM (
    SELECT pair, road_type, lighting, weather, count(*) AS windows, sum(frames) AS frames,
           avg(passed::INTEGER) AS pass_rate, avg(mean_score) AS mean_score
    FROM s GROUP BY ALL
) AS g
LEFT JOIN top_failure AS t USING (pair, road_type, lighting, weather)
ORDER BY g.pair, g.pass_rate, g.windows DESC
