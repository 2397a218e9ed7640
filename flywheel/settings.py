"""One configuration for every component: defaults from the component models, then a TOML file, then FLYWHEEL_*
environment variables (nested with a double underscore, e.g. FLYWHEEL_KAFKA__BOOTSTRAP_SERVERS), then explicit
overrides. The TOML file is `--config`, else $FLYWHEEL_CONFIG, else ./flywheel.toml when it exists.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from ingest.config import AgentConfig, BrokerConfig, KafkaConfig, ServerConfig, SinkConfig

DEFAULT_CONFIG_FILE = Path("flywheel.toml")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLYWHEEL_", env_nested_delimiter="__", extra="forbid", frozen=True)

    kafka: KafkaConfig = Field(default_factory=KafkaConfig, description="Kafka cluster and topics")
    broker: BrokerConfig = Field(default_factory=BrokerConfig, description="the embedded broker (demo and tests)")
    server: ServerConfig = Field(default_factory=ServerConfig, description="gRPC ingest server")
    agent: AgentConfig = Field(default_factory=AgentConfig, description="vehicle agent")
    sink: SinkConfig = Field(default_factory=SinkConfig, description="Kafka -> Parquet sink")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        sources = [init_settings, env_settings]
        toml = getattr(cls, "_toml_file", None)
        if toml is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml))
        return tuple(sources)


def config_file(path: Path | None = None) -> Path | None:
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        return Path(path)
    env = os.environ.get("FLYWHEEL_CONFIG")
    if env:
        return config_file(Path(env))
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def load_settings(path: Path | None = None, **overrides) -> Settings:
    """Effective settings; raises pydantic.ValidationError naming the offending key on bad values."""
    toml = config_file(path)
    cls = type("FileSettings", (Settings,), {"_toml_file": toml}) if toml else Settings
    return cls(**overrides)
