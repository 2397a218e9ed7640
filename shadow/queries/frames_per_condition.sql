-- Frames per condition: how much of the logged fleet data falls under each road type, lighting and weather, and in
-- how many drives (the long tail is where the student is least tested).
SELECT road_type, lighting, weather,
       count(*) AS frames,
       count(DISTINCT drive_id) AS drives,
       round(100.0 * count(*) / sum(count(*)) OVER (), 3) AS pct_frames
FROM frames
GROUP BY ALL
ORDER BY frames DESC, road_type, lighting, weather
