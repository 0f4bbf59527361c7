"""ModelConfig: presets, overrides, validation (all errors together), JSON round trip, visual token counts."""

from __future__ import annotations

import copy
import json
from dataclasses import fields

import pytest

from mobilemllm.config import PRESETS, ModelConfig
from mobilemllm.errors import ConfigError, UserError
from mobilemllm.models.connectors import CONNECTORS
from mobilemllm.templates import TEMPLATES


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_loads_and_validates(name):
    cfg = ModelConfig.from_preset(name)
    assert cfg.name == name
    assert cfg.num_visual_tokens > 0
    assert cfg.connector.kind in CONNECTORS
    assert cfg.template in TEMPLATES
    # the visual tokens must leave room for a prompt in the context
    assert cfg.num_visual_tokens < cfg.llm.max_position_embeddings


def test_tiny_preset_shape():
    cfg = ModelConfig.from_preset("tiny")
    assert (cfg.vision.image_size, cfg.num_visual_tokens) == (32, 16)
    assert (cfg.llm.num_layers, cfg.llm.hidden_size, cfg.llm.vocab_size) == (4, 128, 512)
    assert cfg.llm.max_position_embeddings == 256
    assert cfg.template == "vicuna_short"


def test_overrides_do_not_mutate_presets_or_the_original():
    registry = copy.deepcopy(PRESETS)
    base = ModelConfig.from_preset("tiny")
    before = base.to_dict()
    other = ModelConfig.from_preset("tiny", llm={"num_layers": 7}, connector={"kind": "mlp2x_gelu"})
    third = base.replace(llm={"hidden_size": 256}, vision={"image_mean": [0.1, 0.2, 0.3]}, template="plain")
    assert other.llm.num_layers == 7 and other.llm.hidden_size == 128  # nested override merges, not replaces
    assert other.num_visual_tokens == 64  # mlp2x_gelu keeps all 8x8 patches
    assert third.llm.hidden_size == 256 and third.llm.num_layers == 4
    assert third.vision.image_mean == (0.1, 0.2, 0.3)  # lists from JSON/CLI become tuples again
    assert base.to_dict() == before
    assert PRESETS == registry
    # the returned dict is a copy too
    base.to_dict()["llm"]["num_layers"] = 99
    assert base.llm.num_layers == 4


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_preset("tiny-but-wrong")
    msg = str(e.value)
    assert "tiny-but-wrong" in msg
    for name in PRESETS:
        assert name in msg


def test_unknown_connector_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_preset("tiny", connector={"kind": "qformer"})
    msg = str(e.value)
    assert "qformer" in msg
    for name in ("mlp2x_gelu", "ldp", "ldpv2", "resampler"):
        assert name in msg


def test_unknown_template_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_preset("tiny", template="chatml")
    msg = str(e.value)
    assert "chatml" in msg
    for name in TEMPLATES:
        assert name in msg


def test_all_value_errors_are_reported_together():
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_preset("tiny", connector={"kind": "qformer"}, template="chatml",
                                vision={"kind": "vit", "hires": "anyres", "image_size": 30},
                                llm={"num_heads": 3})
    msg = str(e.value)
    for fragment in ("qformer", "chatml", "'vit'", "'anyres'", "image_size 30", "llm.hidden_size"):
        assert fragment in msg, fragment


def test_all_unknown_keys_are_reported_together():
    data = ModelConfig.from_preset("tiny").to_dict()
    data["vision"]["colour"] = 1
    data["llm"]["layers"] = 2
    data["bogus"] = True
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_dict(data)
    msg = str(e.value)
    for fragment in ("colour", "layers", "bogus"):
        assert fragment in msg
    assert "num_layers" in msg  # the valid keys are listed


def test_unknown_keys_wrong_types_and_bad_values_are_reported_together():
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_preset("tiny", llm={"num_layers": "two", "layers": 2, "tie_word_embeddings": 1},
                                vision={"image_mean": [0.5, 0.5]}, connector={"kind": "qformer"})
    msg = str(e.value)
    for fragment in ("unknown llm key(s): layers", "llm.num_layers must be an integer, got 'two'",
                     "llm.tie_word_embeddings must be true or false", "vision.image_mean must be a list of 3 numbers",
                     "unknown connector 'qformer'"):
        assert fragment in msg, fragment
    with pytest.raises(ConfigError, match="vision must be an object"):
        ModelConfig.from_dict({"vision": 5})
    # ints are fine where floats are expected
    assert ModelConfig.from_preset("tiny", llm={"rope_theta": 500000}).llm.rope_theta == 500000


def test_ldp_needs_an_even_grid():
    with pytest.raises(ConfigError, match="even patch grid"):
        ModelConfig.from_preset("tiny", vision={"image_size": 28})  # 7x7 patches
    # the resampler does not care
    cfg = ModelConfig.from_preset("tiny", vision={"image_size": 28}, connector={"kind": "resampler", "num_queries": 5})
    assert cfg.num_visual_tokens == 5


def test_json_round_trip(tmp_path):
    cfg = ModelConfig.from_preset("mobilevlm-v2-1.7b", vision={"hires": "tiles", "tile_grid": (1, 3)},
                                  llm={"num_kv_heads": 4, "rope_theta": 50000.0})
    path = tmp_path / "config.json"
    cfg.save(path)
    raw = json.loads(path.read_text())
    assert raw["connector"]["kind"] == "ldpv2" and raw["vision"]["tile_grid"] == [1, 3]
    back = ModelConfig.load(path)
    assert back == cfg
    assert isinstance(back.vision.tile_grid, tuple) and isinstance(back.vision.image_mean, tuple)
    assert back.num_visual_tokens == cfg.num_visual_tokens == 144 * 4


def test_load_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        ModelConfig.load(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        ModelConfig.load(bad)


@pytest.mark.parametrize("name,connector", [("mobilevlm-1.7b", "ldp"), ("mobilevlm-3b", "ldp"),
                                            ("mobilevlm-v2-1.7b", "ldpv2"), ("mobilevlm-v2-3b", "ldpv2")])
def test_mobilevlm_presets_have_144_visual_tokens(name, connector):
    cfg = ModelConfig.from_preset(name)
    assert cfg.connector.kind == connector
    assert cfg.vision.num_patches == 576  # 336 px / 14 px patches = 24 x 24
    assert cfg.num_visual_tokens == 144


def test_visual_tokens_per_connector_and_hires_mode():
    cfg = ModelConfig.from_preset("mobilevlm-v2-1.7b")
    assert cfg.replace(connector={"kind": "mlp2x_gelu"}).num_visual_tokens == 576
    assert cfg.replace(connector={"kind": "resampler", "num_queries": 96}).num_visual_tokens == 96
    tiles = cfg.replace(vision={"hires": "tiles"})  # 2x2 tiles + a global view
    assert tiles.vision.num_views == 5
    assert tiles.num_visual_tokens == 5 * 144
    assert cfg.replace(vision={"hires": "tiles", "tile_grid": (1, 2)}).num_visual_tokens == 3 * 144
    assert tiles.replace(connector={"kind": "resampler", "num_queries": 32}).num_visual_tokens == 5 * 32


def test_tiles_queries_and_context_are_checked():
    with pytest.raises(ConfigError, match=r"tile_grid \(0, 2\)"):
        ModelConfig.from_preset("tiny", vision={"hires": "tiles", "tile_grid": [0, 2]})
    with pytest.raises(ConfigError, match="num_queries 0"):
        ModelConfig.from_preset("tiny", connector={"kind": "resampler", "num_queries": 0})
    with pytest.raises(ConfigError, match="80 visual tokens but llm.max_position_embeddings is 64"):
        ModelConfig.from_preset("tiny", vision={"hires": "tiles"}, llm={"max_position_embeddings": 64})
    assert ModelConfig.from_preset("tiny", llm={"max_position_embeddings": 17}).num_visual_tokens == 16


def test_override_schema_names_the_key_of_every_mistake():
    """model_overrides (a recipe's partial ModelConfig) is checked against the dataclasses' own fields and
    types: unknown keys and wrong types are one line that names each key."""
    from mobilemllm.config import override_schema
    from mobilemllm.overrides import validate

    schema = override_schema()
    with pytest.raises(ConfigError) as e:
        validate(schema, {"llm": {"layers": 2, "num_layers": "two", "tie_word_embeddings": 1},
                          "vision": {"image_mean": [0.5, 0.5]}, "colour": 1, "connector": 5}, "model_overrides")
    msg = str(e.value)
    assert "\n" not in msg
    for fragment in ("llm: unknown key(s) layers", "llm.num_layers must be an integer, got 'two'",
                     "llm.tie_word_embeddings must be true or false, got 1", "vision.image_mean has too few items",
                     "unknown key(s) colour", "connector must be a mapping of keys, got 5"):
        assert fragment in msg, fragment
    # partial: only what was given comes back; ints stay ints where floats are expected
    ok = validate(schema, {"llm": {"rope_theta": 500000}, "name": "007"}, "m").model_dump(exclude_unset=True)
    assert ok == {"llm": {"rope_theta": 500000}, "name": "007"}


def test_override_schema_follows_the_dataclasses():
    from mobilemllm.config import ConnectorConfig, LLMConfig, ModelConfig, VisionConfig, override_schema

    schema = override_schema()
    assert set(schema.model_fields) == {f.name for f in fields(ModelConfig)}
    for part, klass in (("vision", VisionConfig), ("connector", ConnectorConfig), ("llm", LLMConfig)):
        sub = schema.model_fields[part].annotation.__args__[0]
        assert set(sub.model_fields) == {f.name for f in fields(klass)}, part


def test_preset_name_can_be_overridden():
    assert ModelConfig.from_preset("tiny", name="my-tiny").name == "my-tiny"
