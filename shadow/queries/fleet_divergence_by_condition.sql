-- Fleet divergence by condition: where the fleet's logged on-board decisions depart from the teacher (the real
-- divergence, not the emulation's), per pair, deployed model and condition, beside the teacher's divergence from the
-- fleet-side emulation of the same frames (emulation_score); a gap between the two is the chip's doing.
--
-- @param pair VARCHAR = '' only this pair id ('' = every pair)
SELECT pair, decision_model, decision_model_version, road_type, lighting, weather,
       count(*) AS frames,
       avg(fleet_score) AS mean_fleet_score,
       avg(emulation_score) AS mean_emulation_score,
       avg(fleet_ade_4s) AS mean_fleet_ade_4s,
       avg(fleet_miss_4s::INT) AS fleet_miss_rate_4s,
       avg(fleet_maneuver_disagree::INT) AS fleet_disagree_rate
FROM onboard
WHERE ($pair = '' OR pair = $pair)
GROUP BY ALL
ORDER BY mean_fleet_score DESC, pair, road_type, lighting, weather
