-- Noise floor per teacher version: the teacher against itself across runtimes. Divergence below these figures is
-- numerical noise, not a behaviour to mine.
SELECT model, any_value(model_name) AS model_name, any_value(model_version) AS model_version,
       runtime_a, runtime_b,
       count(*) AS frames,
       avg(ade_4s) AS mean_ade_4s, max(fde_4s) AS max_fde_4s, approx_quantile(fde_4s, 0.99) AS p99_fde_4s,
       avg(miss_4s::INTEGER) AS miss_rate_4s,
       avg(maneuver_jsd) AS mean_jsd,
       avg(score) AS mean_score, approx_quantile(score, 0.99) AS p99_score, max(score) AS max_score
FROM noise_floor
GROUP BY model, runtime_a, runtime_b
ORDER BY model, runtime_a, runtime_b
