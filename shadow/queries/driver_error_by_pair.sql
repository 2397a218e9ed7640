-- Distance to the logged driver: per pair and condition, how far the teacher's and the student's plans are from what
-- the vehicle then did (mean ADE over the horizon; frames too close to the end of their drive have none), and how
-- often the student's plan comes closer to a logged agent than the teacher's (time to collision). Worst first.
--
-- @param pair VARCHAR = '' only this pair id ('' = every pair)
SELECT pair, road_type, lighting, weather, sum(frames)::BIGINT AS frames,
       sum(driver_frames)::BIGINT AS driver_frames,
       sum(sum_teacher_ade_driver) / sum(driver_frames) AS teacher_ade_driver,
       sum(sum_student_ade_driver) / sum(driver_frames) AS student_ade_driver,
       sum(student_ttc_worse) / sum(frames) AS student_ttc_worse_rate
FROM divergence_summary
WHERE $pair = '' OR pair = $pair
GROUP BY ALL
ORDER BY student_ade_driver - teacher_ade_driver DESC NULLS LAST, pair, road_type, lighting, weather
