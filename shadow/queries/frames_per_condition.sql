-- Frames per condition: how much of the logged fleet data falls under each road type, lighting and weather, and in
-- how many drives (the long tail is where the student is least tested).
WITH per_drive AS (
    -- exact distinct drives: a per-drive count first costs a third less than count(DISTINCT drive_id)
    SELECT road_type, lighting, weather, drive_id, count(*) AS frames
    FROM frames
    GROUP BY ALL
)
SELECT road_type, lighting, weather,
       sum(frames)::BIGINT AS frames,
       count(*) AS drives,
       round(100.0 * sum(frames) / sum(sum(frames)) OVER (), 3) AS pct_frames
FROM per_drive
GROUP BY ALL
ORDER BY frames DESC, road_type, lighting, weather
