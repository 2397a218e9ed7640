-- Divergence by model version: one row per teacher/student pair over every replayed frame (from the divergence
-- rollup). Compare student versions against the same teacher.
WITH names AS (
    SELECT pair, any_value(teacher_name) AS teacher_name, any_value(teacher_version) AS teacher_version,
           any_value(student_name) AS student_name, any_value(student_version) AS student_version
    FROM divergences GROUP BY pair
), totals AS (
    SELECT pair, sum(frames)::BIGINT AS frames, min(date) AS first_day, max(date) AS last_day,
           sum(sum_score) / sum(frames) AS mean_score, max(max_score) AS max_score,
           sum(sum_ade_4s) / sum(frames) AS mean_ade_4s, sum(sum_fde_4s) / sum(frames) AS mean_fde_4s,
           sum(miss_4s) / sum(frames) AS miss_rate_4s, sum(disagree) / sum(frames) AS disagree_rate,
           sum(sum_teacher_ade_driver) / sum(driver_frames) AS teacher_ade_driver,
           sum(sum_student_ade_driver) / sum(driver_frames) AS student_ade_driver
    FROM divergence_summary GROUP BY pair
)
SELECT pair, teacher_name, teacher_version, student_name, student_version, frames, first_day, last_day, mean_score,
       max_score, mean_ade_4s, mean_fde_4s, miss_rate_4s, disagree_rate, teacher_ade_driver, student_ade_driver
FROM totals JOIN names USING (pair)
ORDER BY pair
