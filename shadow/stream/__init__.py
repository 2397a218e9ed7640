"""Streaming shadow replay: `worker` is one member of the consumer group, `state` what it holds per partition."""
