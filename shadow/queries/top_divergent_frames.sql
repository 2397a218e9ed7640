-- Top divergent frames: the single frames with the highest divergence score, optionally under given conditions;
-- the raw material of mining.
--
-- @param limit INTEGER = 20 frames to return
-- @param pair VARCHAR = '' only this pair id ('' = every pair)
-- @param lighting VARCHAR = '' only this lighting, e.g. night ('' = any)
-- @param weather VARCHAR = '' only this weather, e.g. rain ('' = any)
-- @param road_type VARCHAR = '' only this road type, e.g. merge ('' = any)
WITH top AS (
    -- ordered by the score alone: string tie-breakers here would cost a third more over every frame row
    SELECT pair, drive_id, seq, timestamp, road_type, lighting, weather, score, ade_4s, fde_4s, miss_4s,
           maneuver_teacher, maneuver_student, maneuver_jsd, ttc_teacher, ttc_student
    FROM divergences
    WHERE ($pair = '' OR pair = $pair)
      AND ($lighting = '' OR lighting = $lighting)
      AND ($weather = '' OR weather = $weather)
      AND ($road_type = '' OR road_type = $road_type)
    ORDER BY score DESC
    LIMIT $limit
)
SELECT * FROM top ORDER BY score DESC, drive_id, seq, pair
