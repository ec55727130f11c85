"""Typed settings, loaded once from TOML and the environment, validated with one-line errors."""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from i2p2i_bot.guides import GuideName
from i2p2i_bot.lookalikes import fold

DEFAULT_GENERATOR = "CompVis/stable-diffusion-v1-4"
DEFAULT_CLIP = "ViT-L-14/openai"
DEFAULT_CAPTION = "Salesforce/blip-image-captioning-large"
DEFAULT_EDGES_MODEL = "lllyasviel/sd-controlnet-canny"
DEFAULT_DEPTH_MODEL = "lllyasviel/sd-controlnet-depth"
# The MiDaS model of ControlNet's own depth annotator, whose maps the depth ControlNet was trained on.
DEFAULT_DEPTH_ESTIMATOR = "Intel/dpt-hybrid-midas"
DEFAULT_LOOK_MODEL = "h94/IP-Adapter"
DEFAULT_LOOK_WEIGHTS = "models/ip-adapter_sd15.safetensors"

ModelPreset = Literal["default", "smoke"]
# A generator's family ("" in a preset: found from its files); the names match presets.Family.
PresetFamily = Literal["", "sd1", "sd2", "sdxl"]
# The preset made from models.generator and models.clip, the default unless models.default_preset says else.
BUILTIN_PRESET = "sd-v1-4"
_PRESET_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,31}$")
WarmUp = Literal["auto", "on", "off"]
ChannelsLast = Literal["auto", "on", "off"]
Precision = Literal["auto", "fp16", "fp32"]
InterrogateMode = Literal["best", "fast", "classic", "negative", "candidates"]
SchedulerName = Literal["dpm", "pndm"]
SynchronousMode = Literal["NORMAL", "FULL"]
QueueBackend = Literal["local", "redis"]
CompileMode = Literal[
    "auto", "off", "default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"
]


class ConfigError(Exception):
    """A setting is missing, unknown or out of range; the message is one line naming the key."""


@dataclass(frozen=True)
class PresetSettings:
    """One `[[models.presets]]` entry: a generator members may choose by name, with its own defaults."""

    name: str = ""
    # A Hub id, a diffusers folder, or one .safetensors/.ckpt file (loaded with from_single_file).
    generator: str = ""
    # "" finds it from the generator's files (sd1 where they are not here yet).
    family: PresetFamily = ""
    # The interrogator's CLIP for cards made for this preset; "": the family's (presets.FAMILY_CLIP).
    clip: str = ""
    # For a single file: the diffusers folder or Hub id whose configs and tokenizers describe it; "": the
    # family's base repository.
    config: str = ""
    # The default side in pixels; 0: the family's (generate.width x height for sd1, 768 for sd2, 1024 sdxl).
    size: int = 0
    # Defaults for this preset's requests; 0, -1 and "" leave them to [generate].
    steps: int = 0
    guidance: float = -1.0
    negative_prompt: str = ""

    def validate(self) -> None:
        if not _PRESET_NAME.match(self.name):
            raise ConfigError(
                f"models.presets name {self.name!r} must be 1-32 lowercase letters, digits, '.', '_' or '-'"
            )
        if not self.generator.strip():
            raise ConfigError(f"models.presets {self.name!r} must name a generator")
        if self.size and (self.size % 8 or not 64 <= self.size <= 4096):
            raise ConfigError(f"models.presets {self.name!r}: size must be a multiple of 8 from 64 to 4096")
        if self.steps < 0:
            raise ConfigError(f"models.presets {self.name!r}: steps must not be negative")
        if self.guidance != -1.0 and not 0.0 <= self.guidance <= 30.0:
            raise ConfigError(f"models.presets {self.name!r}: guidance must be between 0 and 30")


@dataclass(frozen=True)
class ModelSettings:
    preset: ModelPreset = "default"
    generator: str = DEFAULT_GENERATOR
    clip: str = DEFAULT_CLIP
    caption: str = DEFAULT_CAPTION
    device: str = "auto"
    # The models' floating-point precision; "auto": fp16 on CUDA, fp32 on a CPU.
    precision: Precision = "auto"
    cache_dir: str = ""
    # Run each model once at start so the first request is as fast as the rest; "auto": on CUDA only.
    warm_up: WarmUp = "auto"
    # A folder of LoRA .safetensors files that prompts name with <lora:NAME:WEIGHT>; "": none offered.
    lora_dir: str = ""
    # How many LoRAs one prompt may name.
    max_loras: int = 4
    # Generators members may choose besides the built-in sd-v1-4 (models.generator and models.clip).
    presets: list[PresetSettings] = field(default_factory=list)
    default_preset: str = BUILTIN_PRESET
    # Generators kept on the device at once; 0 ('auto'): 2 on a GPU with more than 16 GB, else 1.
    max_resident: int = 0
    # Generators moved out to CPU RAM, where they come back from faster than from disk; 0: unloaded.
    max_offloaded: int = 1

    def validate(self) -> None:
        _between("models.max_loras", self.max_loras, 1, 16)
        if self.lora_dir and not Path(self.lora_dir).expanduser().is_dir():
            raise ConfigError(f"models.lora_dir {self.lora_dir!r} is not a directory")
        names = [BUILTIN_PRESET, *(p.name for p in self.presets if p.name != BUILTIN_PRESET)]
        if len({p.name for p in self.presets}) != len(self.presets):
            raise ConfigError("models.presets must name each preset once")
        if self.default_preset not in names:
            raise ConfigError(
                f"models.default_preset {self.default_preset!r} is not a preset ({', '.join(names)})"
            )
        _between("models.max_resident", self.max_resident, 0, 16)
        _between("models.max_offloaded", self.max_offloaded, 0, 16)
        if self.device != "auto" and self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(
                f"models.device must be 'auto', 'cpu', 'cuda' or 'cuda:N' (got {self.device!r})"
            )
        for key in ("generator", "clip", "caption"):
            if not getattr(self, key).strip():
                raise ConfigError(f"models.{key} must name a hub id or a local directory")


@dataclass(frozen=True)
class IntakeSettings:
    max_bytes: int = 25 * 1024 * 1024
    max_pixels: int = 40_000_000
    max_side: int = 16384
    # Memory members' uploads may take, all together, from their decoding until their cards are posted; the
    # rest wait their turn.
    decode_memory_mb: int = 1024

    def validate(self) -> None:
        _at_least("intake.max_bytes", self.max_bytes, 1024)
        _at_least("intake.max_pixels", self.max_pixels, 64 * 64)
        _at_least("intake.max_side", self.max_side, 64)
        _between("intake.decode_memory_mb", self.decode_memory_mb, 16, 1024 * 1024)

    @property
    def decode_memory_bytes(self) -> int:
        return self.decode_memory_mb * 1024 * 1024


@dataclass(frozen=True)
class InterrogateSettings:
    mode: InterrogateMode = "best"
    min_flavors: int = 8
    max_flavors: int = 32
    negative_max_flavors: int = 16
    drop_artists: bool = False
    use_default_banned_terms: bool = True
    banned_terms: list[str] = field(default_factory=list)
    labels_dir: str = ""
    label_batch_size: int = 1024
    caption_max_tokens: int = 32
    fast_caption: bool = True
    # Descriptions one member may have in flight at once (from /imagine-from or Re-describe).
    max_describes_per_user: int = 3

    def validate(self) -> None:
        _between("interrogate.min_flavors", self.min_flavors, 1, 64)
        _between("interrogate.max_flavors", self.max_flavors, self.min_flavors, 64)
        _between("interrogate.negative_max_flavors", self.negative_max_flavors, 1, 64)
        _between("interrogate.label_batch_size", self.label_batch_size, 1, 65536)
        _between("interrogate.caption_max_tokens", self.caption_max_tokens, 4, 128)
        _between("interrogate.max_describes_per_user", self.max_describes_per_user, 1, 1000)
        if self.labels_dir and not Path(self.labels_dir).expanduser().is_dir():
            raise ConfigError(f"interrogate.labels_dir {self.labels_dir!r} is not a directory")
        if any(not fold(term).strip() for term in self.banned_terms):
            raise ConfigError("interrogate.banned_terms must not contain empty strings")


@dataclass(frozen=True)
class GenerateSettings:
    steps: int = 25
    max_steps: int = 100
    scheduler: SchedulerName = "dpm"
    guidance: float = 7.5
    width: int = 512
    height: int = 512
    min_side: int = 256
    max_side: int = 768
    max_count: int = 8
    negative_prompt: str = ""
    safety_checker: bool = True
    # Upscale (2×) on a result (the hires fix): how much of the doubled image may change (the layout
    # guide's weight) and the largest side an upscaled image may have, beyond max_side.
    upscale_strength: float = 0.4
    upscale_max_side: int = 1536
    # The fast path (see i2p2i_bot/acceleration.py).
    # "auto": on where the UNet is compiled, off for the eager UNet.
    channels_last: ChannelsLast = "auto"
    fuse_qkv: bool = True
    vae_slicing_from: int = 0
    # "auto": "reduce-overhead" on CUDA, "off" elsewhere.
    compile: CompileMode = "auto"
    compile_buckets: list[int] = field(default_factory=lambda: [1, 2, 4, 8])

    def validate(self) -> None:
        _between("generate.max_steps", self.max_steps, 1, 500)
        _between("generate.steps", self.steps, 1, self.max_steps)
        if not 0.0 <= self.guidance <= 30.0:
            raise ConfigError(f"generate.guidance must be between 0 and 30 (got {self.guidance})")
        for key in ("min_side", "max_side", "width", "height", "upscale_max_side"):
            value = getattr(self, key)
            if value % 8:
                raise ConfigError(f"generate.{key} must be a multiple of 8 (got {value})")
        _between("generate.min_side", self.min_side, 8, 4096)
        _between("generate.max_side", self.max_side, self.min_side, 4096)
        _between("generate.width", self.width, self.min_side, self.max_side)
        _between("generate.height", self.height, self.min_side, self.max_side)
        _between("generate.max_count", self.max_count, 1, 64)
        _between("generate.upscale_max_side", self.upscale_max_side, self.min_side, 4096)
        if not 0.0 < self.upscale_strength <= 1.0:
            raise ConfigError(f"generate.upscale_strength must be in (0, 1] (got {self.upscale_strength})")
        _between("generate.vae_slicing_from", self.vae_slicing_from, 0, 64)
        if not self.compile_buckets or sorted(set(self.compile_buckets)) != self.compile_buckets:
            raise ConfigError("generate.compile_buckets must be batch sizes in increasing order, each once")
        for size in self.compile_buckets:
            _between("generate.compile_buckets", size, 1, 64)


@dataclass(frozen=True)
class GuideSettings:
    """The guides members may choose (i2p2i_bot/guides.py) and the weights those that need some use."""

    # layout needs no weights of its own; edges needs a ControlNet and depth another plus a depth
    # estimator, fetched by download-models only when enabled here, and resident on the GPU only then.
    enabled: list[GuideName] = field(default_factory=lambda: ["layout"])
    # The ControlNets for edges and depth: hub ids or local directories of the generator's family (SD 1.x).
    edges_model: str = DEFAULT_EDGES_MODEL
    depth_model: str = DEFAULT_DEPTH_MODEL
    # The depth estimator depth's ControlNet reads the source through: any of transformers' depth
    # estimation models (DPT/MiDaS, Depth Anything), a hub id or a local directory.
    depth_estimator: str = DEFAULT_DEPTH_ESTIMATOR
    # The IP-Adapter of look: a hub id or a local directory, and its weights file in there; the image
    # encoder is read from the image_encoder folder beside that file, as diffusers' load_ip_adapter does.
    look_model: str = DEFAULT_LOOK_MODEL
    look_weights: str = DEFAULT_LOOK_WEIGHTS

    def validate(self) -> None:
        if len(set(self.enabled)) != len(self.enabled):
            raise ConfigError("guides.enabled must name each guide once")
        for key in ("edges_model", "depth_model", "depth_estimator", "look_model"):
            if not getattr(self, key).strip():
                raise ConfigError(f"guides.{key} must name a hub id or a local directory")
        if not self.look_weights.endswith((".safetensors", ".bin")) or self.look_weights.startswith("/"):
            raise ConfigError(
                "guides.look_weights must be the IP-Adapter's weights file inside look_model, "
                "like models/ip-adapter_sd15.safetensors"
            )


@dataclass(frozen=True)
class QueueSettings:
    max_batch_images: int = 8
    max_queued_jobs_per_user: int = 5
    max_queued_jobs: int = 500
    max_attempts: int = 3
    job_timeout_s: float = 600.0
    # Events a slow subscriber may fall behind by before its oldest step-progress events are dropped.
    subscriber_buffer: int = 256
    # On SIGTERM/SIGINT, how long to let the running batch finish before leaving it to the next start.
    stop_grace_s: float = 30.0
    # "local": this process's GPU makes the images; "redis": GPU workers on other machines pull batches
    # through Redis (i2p2i_bot/remote.py). The URL may carry a password, so it is kept out of reprs and logs.
    backend: QueueBackend = "local"
    redis_url: str = field(default="", repr=False)
    # How long a worker's hold on a batch lasts without renewal: a worker silent this long loses the batch.
    worker_lock_s: float = 30.0
    # How often a worker looks again, between batches, at what it can make (LoRA files, presets' weights);
    # 0: only when it starts.
    worker_rescan_s: float = 30.0

    def validate(self) -> None:
        _between("queue.max_batch_images", self.max_batch_images, 1, 64)
        _between("queue.max_queued_jobs_per_user", self.max_queued_jobs_per_user, 1, 10_000)
        _between("queue.max_queued_jobs", self.max_queued_jobs, 1, 1_000_000)
        _between("queue.max_attempts", self.max_attempts, 1, 100)
        if self.job_timeout_s <= 0:
            raise ConfigError(f"queue.job_timeout_s must be positive (got {self.job_timeout_s})")
        _between("queue.subscriber_buffer", self.subscriber_buffer, 8, 1_000_000)
        if self.stop_grace_s < 0:
            raise ConfigError(f"queue.stop_grace_s must not be negative (got {self.stop_grace_s})")
        if self.backend == "redis" and not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                "queue.backend 'redis' needs a redis://, rediss:// or unix:// URL in I2P2I_REDIS_URL "
                "(or queue.redis_url)"
            )
        if not 1.0 <= self.worker_lock_s <= 3600.0:
            raise ConfigError(f"queue.worker_lock_s must be between 1 and 3600 (got {self.worker_lock_s})")
        if not 0.0 <= self.worker_rescan_s <= 86400.0:
            raise ConfigError(
                f"queue.worker_rescan_s must be between 0 and 86400 (got {self.worker_rescan_s})"
            )


@dataclass(frozen=True)
class StoreSettings:
    path: str = "i2p2i.sqlite3"
    busy_timeout_ms: int = 5000
    # NORMAL survives any crash of the process; FULL also survives a power cut, at a cost per commit.
    synchronous: SynchronousMode = "NORMAL"

    def validate(self) -> None:
        if not self.path.strip():
            raise ConfigError("store.path must name a database file")
        _between("store.busy_timeout_ms", self.busy_timeout_ms, 0, 600_000)


@dataclass(frozen=True)
class DiscordSettings:
    # The token is a secret: it is read from DISCORD_TOKEN only, never from a file that might be shared.
    token: str = field(default="", repr=False)
    api_base: str = "https://discord.com/api/v10"
    gateway_url: str = "wss://gateway.discord.gg/"
    admin_role_ids: list[int] = field(default_factory=list)
    sync_guild_id: int = 0
    # At start, how long to keep trying while Discord cannot be reached before bot.py exits with code 4.
    start_retry_s: float = 60.0
    # Members may edit a card's prompt, or make a result again with an edited prompt, by replying to it. Needs
    # the privileged message-content intent (docs/permissions.md); off, the bot asks for no privileged intent.
    reply_edits: bool = False

    def validate(self) -> None:
        if not self.api_base.startswith(("http://", "https://")):
            raise ConfigError(f"discord.api_base must be an http(s) URL (got {self.api_base!r})")
        if not self.gateway_url.startswith(("ws://", "wss://")):
            raise ConfigError(f"discord.gateway_url must be a ws(s) URL (got {self.gateway_url!r})")
        if self.start_retry_s < 0:
            raise ConfigError(f"discord.start_retry_s must not be negative (got {self.start_retry_s})")


@dataclass(frozen=True)
class Settings:
    data_dir: str = "data"
    models: ModelSettings = field(default_factory=ModelSettings)
    intake: IntakeSettings = field(default_factory=IntakeSettings)
    interrogate: InterrogateSettings = field(default_factory=InterrogateSettings)
    generate: GenerateSettings = field(default_factory=GenerateSettings)
    guides: GuideSettings = field(default_factory=GuideSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    discord: DiscordSettings = field(default_factory=DiscordSettings)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def sources_path(self) -> Path:
        """Where the bot keeps each uploaded image, normalised, as `<sha256>.png` (for Re-describe)."""
        return self.data_path / "sources"

    @property
    def cache_path(self) -> Path:
        """Where smoke models and label-embedding tables are kept."""
        if self.models.cache_dir:
            return Path(self.models.cache_dir).expanduser()
        return self.data_path / "cache"

    @property
    def database_path(self) -> Path:
        path = Path(self.store.path).expanduser()
        return path if path.is_absolute() else self.data_path / path

    def with_preset(self, preset: ModelPreset) -> Settings:
        return dataclasses.replace(self, models=dataclasses.replace(self.models, preset=preset))


# Environment variables that override settings: secrets and paths, which differ per host.
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "DISCORD_TOKEN": ("discord", "token"),
    "I2P2I_DATA_DIR": ("", "data_dir"),
    "I2P2I_DATABASE": ("store", "path"),
    "I2P2I_CACHE_DIR": ("models", "cache_dir"),
    "I2P2I_DEVICE": ("models", "device"),
    "I2P2I_REDIS_URL": ("queue", "redis_url"),
}


def load_settings(path: str | Path | None = None, env: typing.Mapping[str, str] | None = None) -> Settings:
    """Read settings from a TOML file (optional) and the environment; raise ConfigError on any problem."""
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    for var, (section, key) in ENV_OVERRIDES.items():
        if env.get(var):
            table = raw.setdefault(section, {}) if section else raw
            if not isinstance(table, dict):
                raise ConfigError(f"{section} must be a table")
            table[key] = env[var]
    if "token" in raw.get("discord", {}) and not env.get("DISCORD_TOKEN"):
        raise ConfigError("discord.token cannot be set in the config file; set the DISCORD_TOKEN variable")
    return _build(Settings, raw, "")


# Settings that were merged into others: a config file naming one is told where it went.
REPLACED = {"queue.max_images_per_job": "generate.max_count"}


def _build(cls: type[Any], raw: dict[str, Any], prefix: str) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if f"{prefix}{key}" in REPLACED:
            raise ConfigError(
                f"{prefix}{key} is now {REPLACED[prefix + key]}, which caps the images of every request"
            )
        if key not in names:
            raise ConfigError(f"unknown setting {prefix}{key}")
    values: dict[str, Any] = {}
    for name in names:
        if name not in raw:
            continue
        hint = hints[name]
        full = f"{prefix}{name}"
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            if not isinstance(raw[name], dict):
                raise ConfigError(f"{full} must be a table")
            values[name] = _build(hint, raw[name], f"{full}.")
        else:
            values[name] = _coerce(full, hint, raw[name])
    obj = cls(**values)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate()
    return obj


def _coerce(key: str, hint: Any, value: Any) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        choices = get_args(hint)
        if isinstance(value, bool) and "on" in choices and "off" in choices:
            value = "on" if value else "off"
        if value not in choices:
            allowed = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"{key} must be one of {allowed} (got {value!r})")
        return value
    if origin is list:
        (item,) = get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list (got {value!r})")
        if isinstance(item, type) and dataclasses.is_dataclass(item):
            if not all(isinstance(v, dict) for v in value):
                raise ConfigError(f"{key} must be a list of tables ([[{key}]])")
            return [_build(item, v, f"{key}.") for v in value]
        return [_coerce(f"{key}[{i}]", item, v) for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise TypeError(f"unsupported setting type for {key}")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        raise ConfigError(f"{key} must be true or false (got {value!r})")
    if hint is int:
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"{key} must be a whole number (got {value!r})") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be a whole number (got {value!r})")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number (got {value!r})") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number (got {value!r})")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string (got {value!r})")
        return value
    raise TypeError(f"unsupported setting type for {key}: {hint!r}")


def _at_least(key: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{key} must be at least {low} (got {value})")


def _between(key: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise ConfigError(f"{key} must be between {low} and {high} (got {value})")
