"""Importers of robotics log formats into the drive directory (`ingest.lake` layout): `mcap` (MCAP logs of
`flywheel.v1.Frame` protobuf messages) today."""
