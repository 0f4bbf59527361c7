"""Model configuration: nested dataclasses (vision, connector, llm) and a registry of presets by name.

    >>> cfg = ModelConfig.from_preset("tiny", llm={"num_layers": 4})
    >>> cfg.num_visual_tokens
    16

A config is saved as JSON beside the weights (``config.json`` of a checkpoint folder). Loading or
overriding never mutates the caller's object: every method returns a new config.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from mobilemllm.errors import ConfigError, UserError
from mobilemllm.overrides import section_from_dataclass
from mobilemllm.templates import TEMPLATES

CONFIG_FORMAT_VERSION = 1

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

VISION_KINDS = ("clip", "siglip")
HIRES_MODES = ("direct", "tiles")
IMAGE_ASPECTS = ("pad", "resize")


@dataclass
class VisionConfig:
    """The vision tower: a transformers CLIP or SigLIP vision model."""

    kind: str = "clip"
    image_size: int = 336
    patch_size: int = 14
    hidden_size: int = 1024
    num_layers: int = 24
    num_heads: int = 16
    intermediate_size: int = 4096
    select_layer: int = -2  # hidden state used as features (-2: penultimate layer, as LLaVA/MobileVLM)
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    image_aspect: str = "pad"  # "pad": pad to square with the mean colour, then resize; "resize": stretch
    hires: str = "direct"  # "direct": resize to image_size; "tiles": grid of tiles + a global view
    tile_grid: tuple[int, int] = (2, 2)  # rows, cols of tiles when hires == "tiles"
    pretrained_path: str | None = None  # a local transformers folder to load weights from

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_views(self) -> int:
        """How many encoder-sized views one image becomes (tiles + the global view)."""
        if self.hires == "tiles":
            return self.tile_grid[0] * self.tile_grid[1] + 1
        return 1

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """RGB fill for padding to a square: the mean times 255, truncated as LLaVA/MobileVLM's
        ``tuple(int(x * 255) for x in image_mean)`` (CLIP: (122, 116, 104)), so padded pixels match upstream."""
        return tuple(int(m * 255) for m in self.image_mean)


def square_grid(num_patches: int) -> int:
    """The side of a square patch grid (connectors that pool or merge need one)."""
    side = math.isqrt(num_patches)
    if side * side != num_patches:
        raise ValueError(f"connector needs a square patch grid, got {num_patches} tokens")
    return side


# The connectors by name, each with its shape arithmetic: LLM tokens made from ``n`` patch features.
# This is the one list of connector names (presets, overrides and `--help` read it); the modules that
# implement each name are registered against it in mobilemllm/models/connectors.py.
CONNECTOR_TOKENS: dict[str, Callable[["ConnectorConfig", int], int]] = {
    "mlp2x_gelu": lambda cfg, n: n,
    "ldp": lambda cfg, n: ((square_grid(n) + 1) // 2) ** 2,
    "ldpv2": lambda cfg, n: (square_grid(n) // cfg.pool) ** 2,
    "patch_merger": lambda cfg, n: (square_grid(n) // cfg.pool) ** 2,
    "resampler": lambda cfg, n: cfg.num_queries,
}


@dataclass
class ConnectorConfig:
    """The projector from vision features to LLM embeddings."""

    kind: str = "ldpv2"
    num_queries: int = 64  # resampler only
    num_heads: int = 8  # resampler only
    # ldpv2: average-pooling window (MobileVLM V2: 2x2, a quarter of the patches); patch_merger: the block of
    # patches concatenated into one token
    pool: int = 2
    # A LayerNorm on the visual tokens, its gain starting at output_norm_gain: keeps them near the text
    # embeddings' scale (without it the tiny model's grow to ~90x), so what later layers write into them
    # (e.g. the question, with the vicuna_short_qfirst template) is not drowned. Off for published models.
    output_norm: bool = False
    output_norm_gain: float = 0.1


@dataclass
class LLMConfig:
    """A LLaMA-family decoder (MobileLLaMA): RoPE, RMSNorm, SwiGLU."""

    vocab_size: int = 32000
    hidden_size: int = 2048
    num_layers: int = 24
    num_heads: int = 16
    num_kv_heads: int | None = None  # None: same as num_heads (no GQA)
    intermediate_size: int = 5632
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    pretrained_path: str | None = None  # a local transformers causal-LM folder

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclass
class ModelConfig:
    """A whole VLM: vision tower + connector + LLM + how prompts are written."""

    name: str = "custom"
    vision: VisionConfig = field(default_factory=VisionConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    template: str = "vicuna_v1"  # conversation template used for chat (see mobilemllm.templates)
    image_token: str = "<image>"
    format_version: int = CONFIG_FORMAT_VERSION

    # ---- derived -------------------------------------------------------------------------
    @property
    def tokens_per_view(self) -> int:
        kind = self.connector.kind
        if kind not in CONNECTOR_TOKENS:
            raise ConfigError(f"unknown connector {kind!r}; valid connectors: {', '.join(sorted(CONNECTOR_TOKENS))}")
        return CONNECTOR_TOKENS[kind](self.connector, self.vision.num_patches)

    @property
    def num_visual_tokens(self) -> int:
        """Visual tokens one image occupies in the LLM's context."""
        return self.tokens_per_view * self.vision.num_views

    # ---- construction --------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, /, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; valid presets: {', '.join(sorted(PRESETS))}")
        cfg = cls.from_dict(copy.deepcopy(PRESETS[name]))
        return cfg.replace(**overrides) if overrides else cfg

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        data = copy.deepcopy(data)
        errors: list[str] = []
        sub = {"vision": VisionConfig, "connector": ConnectorConfig, "llm": LLMConfig}
        kwargs: dict[str, Any] = {}
        known = {f.name for f in fields(cls)}
        for key, value in data.items():
            if key not in known:
                errors.append(f"unknown key {key!r}")
                continue
            if key in sub:
                if value is not None and not isinstance(value, dict):
                    errors.append(f"{key} must be an object of {sub[key].__name__} fields, got {value!r}")
                    continue
                kwargs[key] = _build(sub[key], value or {}, key, errors)
            else:
                kwargs[key] = value
        for key in ("name", "template", "image_token"):
            if key in kwargs and not isinstance(kwargs[key], str):
                errors.append(f"{key} must be a string, got {kwargs.pop(key)!r}")
        if errors:  # also report what validation finds in the parts that could be read
            try:
                cls(**kwargs).validate()
            except (ConfigError, TypeError, ValueError) as e:
                if isinstance(e, ConfigError):
                    errors.append(str(e).removeprefix("invalid model config: "))
            raise ConfigError("invalid model config: " + "; ".join(errors))
        cfg = cls(**kwargs)
        cfg.validate()
        return cfg

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A new config with overrides; nested parts take dicts (``llm={"num_layers": 4}``)."""
        data = self.to_dict()
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(data.get(key), dict):
                data[key].update(value)
            elif dataclasses.is_dataclass(value):
                data[key] = asdict(value)
            else:
                data[key] = value
        return ModelConfig.from_dict(data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"{path} does not exist") from None
        except json.JSONDecodeError as e:
            raise UserError(f"{path} is not valid JSON ({e})") from None
        return cls.from_dict(data)

    def validate(self) -> None:
        """Collect every problem and report them together."""
        errors: list[str] = []
        v, c, l = self.vision, self.connector, self.llm
        if v.kind not in VISION_KINDS:
            errors.append(f"vision.kind {v.kind!r} is not one of {', '.join(VISION_KINDS)}")
        if v.hires not in HIRES_MODES:
            errors.append(f"vision.hires {v.hires!r} is not one of {', '.join(HIRES_MODES)}")
        if v.image_aspect not in IMAGE_ASPECTS:
            errors.append(f"vision.image_aspect {v.image_aspect!r} is not one of {', '.join(IMAGE_ASPECTS)}")
        if v.image_size % v.patch_size:
            errors.append(f"vision.image_size {v.image_size} is not a multiple of patch_size {v.patch_size}")
        if v.hidden_size % v.num_heads:
            errors.append("vision.hidden_size must be divisible by vision.num_heads")
        if v.hires == "tiles" and (len(v.tile_grid) != 2 or min(v.tile_grid) < 1):
            errors.append(f"vision.tile_grid {tuple(v.tile_grid)} must be two positive numbers (rows, cols)")
        if c.kind == "resampler" and c.num_queries < 1:
            errors.append(f"connector.num_queries {c.num_queries} must be at least 1")
        if c.output_norm and not c.output_norm_gain > 0:
            errors.append(f"connector.output_norm_gain {c.output_norm_gain} must be positive")
        if c.kind not in CONNECTOR_TOKENS:
            errors.append(f"unknown connector {c.kind!r}; valid connectors: {', '.join(sorted(CONNECTOR_TOKENS))}")
        elif c.kind in ("ldpv2", "patch_merger") and (c.pool < 1 or v.grid % c.pool):
            errors.append(f"connector.pool {c.pool} must be at least 1 and divide the {v.grid}x{v.grid} patch grid"
                          + (f" (connector {c.kind} needs an even patch grid)" if c.pool == 2 else ""))
        elif c.kind == "ldp" and v.grid % 2:
            errors.append(f"connector {c.kind} needs an even patch grid, got {v.grid}x{v.grid}")
        if l.hidden_size % l.num_heads:
            errors.append("llm.hidden_size must be divisible by llm.num_heads")
        if l.num_heads % l.kv_heads:
            errors.append("llm.num_heads must be a multiple of llm.num_kv_heads")
        if l.head_dim % 2:
            errors.append("llm head_dim (hidden_size / num_heads) must be even for RoPE")

        if self.template not in TEMPLATES:
            errors.append(f"unknown template {self.template!r}; valid templates: {', '.join(sorted(TEMPLATES))}")
        if not errors and self.num_visual_tokens >= l.max_position_embeddings:
            errors.append(f"an image takes {self.num_visual_tokens} visual tokens but llm.max_position_embeddings "
                          f"is {l.max_position_embeddings}: raise the context or use fewer visual tokens")
        if errors:
            raise ConfigError("invalid model config: " + "; ".join(errors))


@functools.cache
def override_schema() -> type:
    """The pydantic schema of partial ModelConfig overrides (a training recipe's ``model_overrides``): the
    dataclasses' own fields and types, every key optional, unknown keys refused. A field added to a
    dataclass above is accepted here with no other change. Value checks (known connector, template,
    divisible sizes) stay in :meth:`ModelConfig.validate`."""
    parts = {name: section_from_dataclass(klass, f"{klass.__name__}Overrides", all_optional=True) | None
             for name, klass in (("vision", VisionConfig), ("connector", ConnectorConfig), ("llm", LLMConfig))}
    return section_from_dataclass(ModelConfig, "ModelConfigOverrides", nested=parts, all_optional=True)


def _build(klass: type, data: dict[str, Any], prefix: str, errors: list[str]) -> Any:
    """Build a part from a dict, appending problems (unknown keys, wrong types) to ``errors``; fields with
    problems keep their defaults so the rest can still be validated."""
    by_name = {f.name: f for f in fields(klass)}
    unknown = sorted(set(data) - set(by_name))
    if unknown:
        errors.append(f"unknown {prefix} key(s): {', '.join(unknown)} (valid: {', '.join(sorted(by_name))})")
    kwargs = {}
    for key, value in data.items():
        if key not in by_name:
            continue
        if isinstance(value, list):
            value = tuple(value)
        f = by_name[key]
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is not None and value is not None and not _same_kind(value, default):
            errors.append(f"{prefix}.{key} must be {_kind_name(default)}, got {value!r}")
            continue
        kwargs[key] = value
    return klass(**kwargs)


def _same_kind(value: Any, default: Any) -> bool:
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, tuple):
        return isinstance(value, tuple) and len(value) == len(default) and all(
            _same_kind(v, d) for v, d in zip(value, default))
    return isinstance(value, type(default))


def _kind_name(default: Any) -> str:
    if isinstance(default, tuple):
        return f"a list of {len(default)} numbers"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(type(default), "valid")


# ---- presets ---------------------------------------------------------------------------------
_CLIP_L_336 = dict(kind="clip", image_size=336, patch_size=14, hidden_size=1024, num_layers=24, num_heads=16,
                   intermediate_size=4096)
_MOBILELLAMA_1_4B = dict(vocab_size=32000, hidden_size=2048, num_layers=24, num_heads=16, intermediate_size=5632,
                         max_position_embeddings=2048)
_MOBILELLAMA_2_7B = dict(vocab_size=32000, hidden_size=2560, num_layers=32, num_heads=32, intermediate_size=6912,
                         max_position_embeddings=2048)

PRESETS: dict[str, dict[str, Any]] = {
    # Built-in default: trains on a laptop CPU in minutes on the synthetic "shapes" world.
    "tiny": dict(
        name="tiny",
        vision=dict(kind="clip", image_size=32, patch_size=4, hidden_size=64, num_layers=2, num_heads=4,
                    intermediate_size=256, select_layer=-1, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)),
        connector=dict(kind="ldpv2"),
        llm=dict(vocab_size=512, hidden_size=128, num_layers=4, num_heads=4, intermediate_size=384,
                 max_position_embeddings=256, tie_word_embeddings=True),
        template="vicuna_short",
    ),
    # A mid-size random-weight shape for benchmarks (8 layers, hidden 512, vocab 32000).
    "bench": dict(
        name="bench",
        vision=dict(kind="clip", image_size=224, patch_size=14, hidden_size=384, num_layers=6, num_heads=6,
                    intermediate_size=1536),
        connector=dict(kind="ldpv2"),
        llm=dict(vocab_size=32000, hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1408,
                 max_position_embeddings=1024),
    ),
    "mobilellama-1.4b": dict(name="mobilellama-1.4b", vision=_CLIP_L_336, connector=dict(kind="ldpv2"),
                             llm=_MOBILELLAMA_1_4B),
    "mobilellama-2.7b": dict(name="mobilellama-2.7b", vision=_CLIP_L_336, connector=dict(kind="ldpv2"),
                             llm=_MOBILELLAMA_2_7B),
    "mobilevlm-1.7b": dict(name="mobilevlm-1.7b", vision=_CLIP_L_336, connector=dict(kind="ldp"),
                           llm=_MOBILELLAMA_1_4B),
    "mobilevlm-3b": dict(name="mobilevlm-3b", vision=_CLIP_L_336, connector=dict(kind="ldp"), llm=_MOBILELLAMA_2_7B),
    "mobilevlm-v2-1.7b": dict(name="mobilevlm-v2-1.7b", vision=_CLIP_L_336, connector=dict(kind="ldpv2"),
                              llm=_MOBILELLAMA_1_4B),
    "mobilevlm-v2-3b": dict(name="mobilevlm-v2-3b", vision=_CLIP_L_336, connector=dict(kind="ldpv2"),
                            llm=_MOBILELLAMA_2_7B),
}
