-- Closed-loop gap: the frames where the student's plan, driven in the log-replay closed loop, scores furthest below
-- the teacher's from the same frame (the log_replay rows of both models of a pair), with the sub-scores that made
-- the difference. The closed-loop counterpart of top_divergent_frames; a mining query can select from it.
--
-- @param limit INTEGER = 20 frames to return
-- @param pair VARCHAR = '' only this pair id ('' = every pair)
-- @param min_gap DOUBLE = 0 only frames where the teacher's score exceeds the student's by more than this
WITH d AS (
    SELECT pair, drive_id, seq, split_part(pair, '__', 1) AS teacher, split_part(pair, '__', 2) AS student
    FROM divergences WHERE $pair = '' OR pair = $pair
)
SELECT d.pair, d.drive_id, d.seq, s.timestamp, s.road_type, s.lighting, s.weather,
       t.score AS teacher_score, s.score AS student_score, t.score - s.score AS gap,
       s.no_at_fault_collision AS student_no_at_fault_collision,
       s.drivable_area_compliance AS student_drivable_area_compliance,
       s.ttc_within_bound AS student_ttc_within_bound, s.ego_progress AS student_ego_progress,
       t.ego_progress AS teacher_ego_progress, s.comfort AS student_comfort, s.horizon_s
FROM d
JOIN log_replay AS t ON t.model = d.teacher AND t.drive_id = d.drive_id AND t.seq = d.seq
JOIN log_replay AS s ON s.model = d.student AND s.drive_id = d.drive_id AND s.seq = d.seq
WHERE t.score - s.score > $min_gap
ORDER BY gap DESC, d.drive_id, d.seq, d.pair
LIMIT $limit
