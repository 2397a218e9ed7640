-- Log-replay closed loop by condition: per model (teacher and students alike) and condition, how its plans fare
-- when driven for 4 s from every frame among the logged agents (`shadow.log_replay`, NAVSIM's PDM score): mean
-- score, the share of frames failing each multiplicative or weighted sub-score, and the mean progress ratio.
--
-- @param model VARCHAR = '' only this model id, e.g. student-v0 ('' = every model)
-- @param min_horizon_s DOUBLE = 4 only frames whose logged future covered at least this much of the horizon [s]
SELECT model, road_type, lighting, weather,
       count(*) AS frames,
       avg(score) AS mean_score,
       avg((no_at_fault_collision < 1)::INT) AS at_fault_collision_rate,
       avg((drivable_area_compliance < 1)::INT) AS off_drivable_rate,
       avg((ttc_within_bound < 1)::INT) AS ttc_violation_rate,
       avg((comfort < 1)::INT) AS uncomfortable_rate,
       avg(ego_progress) AS mean_progress
FROM log_replay
WHERE ($model = '' OR model = $model) AND horizon_s >= $min_horizon_s - 1e-4
GROUP BY ALL
ORDER BY model, mean_score, road_type, lighting, weather
