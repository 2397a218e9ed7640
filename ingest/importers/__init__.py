"""Importers of fleet and public-dataset log formats into the drive directory (`ingest.lake` layout), one module
per format: `ros2` (ROS 2 MCAP with standard messages), `waymo` (Waymo Open Motion Dataset TFRecords), `av2`
(Argoverse 2 motion-forecasting parquet), `nuplan` (nuPlan SQLite logs), `mcap` (the project's own MCAP). `run`
drives them (`flywheel import --format F SRC...`); `common` holds the resampling onto the frame contract. The bulk
decoders: `mcap_scan` (an MCAP file's messages in one buffer), `cdr` (ROS 2 messages column-wise, from the schema in
the file), `pbcolumns` (protobuf messages column-wise, from their descriptor)."""
