"""Retraining jobs: `models` (specs, states, configs), `store` (the durable queue in SQLite), `runner` and `adapter`
(running a job's cycle), `service` and `client` (the RetrainControl gRPC service, `messages` its conversions,
`wire/` its generated stubs) and `policy` (triggers from the lake)."""
