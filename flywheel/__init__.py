"""The umbrella package: one configuration and one console script wiring ingest, shadow and retrain together."""
