"""Settings: TOML and environment in, one-line errors naming the key out."""

from __future__ import annotations

import dataclasses
import tomllib
import typing
from pathlib import Path

import pytest

from i2p2i_bot.config import ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    return path


def test_defaults_without_a_file() -> None:
    """With no file and no environment, settings are the documented defaults."""
    settings = load_settings(None, env={})
    assert settings == Settings()
    assert settings.models.generator == "CompVis/stable-diffusion-v1-4"
    assert settings.models.clip == "ViT-L-14/openai"
    assert settings.generate.steps == 25 and settings.generate.scheduler == "dpm"


def test_values_are_read_from_toml(tmp_path: Path) -> None:
    """Keys in the file replace the defaults they name and leave the rest alone."""
    path = write(tmp_path, '[generate]\nsteps = 40\nguidance = 6\n[models]\npreset = "smoke"\n')
    settings = load_settings(path, env={})
    assert settings.generate.steps == 40
    assert settings.generate.guidance == 6.0 and isinstance(settings.generate.guidance, float)
    assert settings.models.preset == "smoke"
    assert settings.generate.width == 512


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("[generate]\nstepz = 3\n", "unknown setting generate.stepz"),
        ("[nonsense]\nx = 1\n", "unknown setting nonsense"),
        ('[generate]\nsteps = "many"\n', "generate.steps must be a whole number"),
        ("[generate]\nsteps = 0\n", "generate.steps must be between 1 and 100"),
        ("[generate]\nwidth = 500\n", "generate.width must be a multiple of 8"),
        ('[models]\npreset = "huge"\n', "models.preset must be one of 'default', 'smoke'"),
        ('[models]\ndevice = "tpu"\n', "models.device must be"),
        ("[queue]\nmax_batch_images = 0\n", "queue.max_batch_images must be between 1 and 64"),
        (
            "[interrogate]\nmax_describes_per_user = 0\n",
            "interrogate.max_describes_per_user must be between 1 and 1000",
        ),
        ("[interrogate]\nbanned_terms = [1]\n", "interrogate.banned_terms[0] must be a string"),
        ("[interrogate]\ndrop_artists = 3\n", "interrogate.drop_artists must be true or false"),
        ("generate = 3\n", "generate must be a table"),
        ('[discord]\ntoken = "abc"\n', "DISCORD_TOKEN"),
        ('[queue]\nbackend = "celery"\n', "queue.backend must be one of 'local', 'redis'"),
        ('[queue]\nbackend = "redis"\n', "queue.backend 'redis' needs a redis://"),
        ('[queue]\nbackend = "redis"\nredis_url = "http://x"\n', "I2P2I_REDIS_URL"),
        ("[queue]\nworker_lock_s = 0.5\n", "queue.worker_lock_s must be between 1 and 3600"),
        ("[queue]\nworker_rescan_s = -1\n", "queue.worker_rescan_s must be between 0 and 86400"),
        (
            '[guides]\nenabled = ["pose"]\n',
            "guides.enabled[0] must be one of 'layout', 'edges', 'depth', 'look'",
        ),
        ('[guides]\nenabled = ["edges", "edges"]\n', "guides.enabled must name each guide once"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    """Every bad file stops with one line that names the offending key."""
    with pytest.raises(ConfigError) as info:
        load_settings(write(tmp_path, text), env={})
    message = str(info.value)
    assert needle in message
    assert "\n" not in message


def test_missing_and_broken_files(tmp_path: Path) -> None:
    """A missing file or invalid TOML is reported with the path, not a traceback."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_settings(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(write(tmp_path, "[generate\n"), env={})


def test_environment_overrides_secrets_and_paths(tmp_path: Path) -> None:
    """DISCORD_TOKEN and the path variables win over the file; the token never shows in repr."""
    path = write(tmp_path, '[store]\npath = "from-file.sqlite3"\n')
    env = {
        "DISCORD_TOKEN": "secret-token-value",
        "I2P2I_DATA_DIR": str(tmp_path / "d"),
        "I2P2I_DATABASE": "/var/lib/i2p2i/db.sqlite3",
        "I2P2I_DEVICE": "cpu",
    }
    settings = load_settings(path, env=env)
    assert settings.discord.token == "secret-token-value"
    assert settings.data_path == tmp_path / "d"
    assert settings.database_path == Path("/var/lib/i2p2i/db.sqlite3")
    assert settings.models.device == "cpu"
    assert "secret-token-value" not in repr(settings)


def test_the_redis_url_comes_from_the_environment_and_stays_out_of_reprs(tmp_path: Path) -> None:
    """I2P2I_REDIS_URL fills queue.redis_url, and its password shows in no repr of the settings."""
    url = "rediss://:hunter2-secret@redis.example:6380/0"
    settings = load_settings(write(tmp_path, '[queue]\nbackend = "redis"\n'), env={"I2P2I_REDIS_URL": url})
    assert settings.queue.backend == "redis"
    assert settings.queue.redis_url == url
    assert "hunter2-secret" not in repr(settings)


def test_relative_paths_live_in_the_data_dir(tmp_path: Path) -> None:
    """The database and caches default to places under data_dir."""
    settings = load_settings(write(tmp_path, f'data_dir = "{tmp_path}/x"\n'), env={})
    assert settings.database_path == tmp_path / "x" / "i2p2i.sqlite3"
    assert settings.cache_path == tmp_path / "x" / "cache"


def _fields(cls: type, prefix: str = "") -> set[str]:
    names = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            names |= _fields(hints[f.name], f"{f.name}.")
        else:
            names.add(prefix + f.name)
    return names


def _keys(table: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in table.items():
        if isinstance(value, dict):
            keys |= _keys(value, f"{key}.")
        else:
            keys.add(prefix + key)
    return keys


def test_example_config_documents_every_setting() -> None:
    """config.example.toml names every setting but the token, and its values are the defaults."""
    text = (ROOT / "config.example.toml").read_text(encoding="utf-8")
    documented = _keys(tomllib.loads(text))
    expected = _fields(Settings) - {"discord.token"}
    assert documented == expected
    assert "DISCORD_TOKEN" in text
    assert load_settings(ROOT / "config.example.toml", env={}) == Settings()


def test_switches_with_an_automatic_setting_take_true_and_false_too(tmp_path: Path) -> None:
    """channels_last was a plain switch: files that still say true or false keep working."""
    on = load_settings(write(tmp_path, "[generate]\nchannels_last = true\n"), env={})
    assert on.generate.channels_last == "on"
    off = load_settings(write(tmp_path, "[generate]\nchannels_last = false\n"), env={})
    assert off.generate.channels_last == "off"
    assert load_settings(write(tmp_path, ""), env={}).generate.channels_last == "auto"
    with pytest.raises(ConfigError, match=r"generate\.channels_last must be one of 'auto', 'on', 'off'"):
        load_settings(write(tmp_path, '[generate]\nchannels_last = "yes"\n'), env={})
