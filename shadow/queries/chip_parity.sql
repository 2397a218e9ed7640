-- Chip parity by vehicle and model version: per pair, vehicle and the deployed model its frames name, how often the
-- logged on-board decision departs from the fleet-side emulation of that artifact (the replayed student): frames
-- checked, frames out of parity (a waypoint farther than the tolerance, or another maneuver), the largest and the
-- mean error. A vehicle, chip or software version out of parity runs something else than the artifact it names.
--
-- @param pair VARCHAR = '' only this pair id ('' = every pair)
-- @param min_fail_rate DOUBLE = 0 leave out vehicles whose share of frames out of parity is below this
SELECT pair, vehicle_id, decision_model, decision_model_version,
       count(*) AS frames_checked,
       count(*) FILTER (WHERE NOT parity_ok) AS frames_failed,
       avg((NOT parity_ok)::INT) AS fail_rate,
       max(parity_max_err_m) AS max_err_m,
       avg(parity_max_err_m) AS mean_err_m,
       avg((NOT parity_maneuver_agree)::INT) AS maneuver_mismatch_rate
FROM onboard
WHERE parity_checked AND ($pair = '' OR pair = $pair)
GROUP BY ALL
HAVING avg((NOT parity_ok)::INT) >= $min_fail_rate
ORDER BY fail_rate DESC, max_err_m DESC, pair, vehicle_id
