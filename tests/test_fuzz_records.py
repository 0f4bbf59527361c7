"""Property-based fuzz of the data record parser: any JSON value as a data file, a record or a field
either loads or raises a DataError (one line for the user), never another exception.

Bounded (a few hundred examples, no example database) so it runs in seconds; hypothesis shrinks a
failure to a minimal record, printed in the test output.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mobilemllm.data.dataset import (ConversationDataset, PreferenceDataset, parse_records, validate_conversation,
                                     validate_preference)
from mobilemllm.errors import DataError

FUZZ = settings(max_examples=120, deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# strings that reach the interesting branches: roles, the placeholder, names in and out of the folder,
# lone surrogates (JSON's "\ud800") and bytes Python escaped from a command line
SPECIAL = st.sampled_from(["human", "gpt", "user", "assistant", "<image>", "<image>\nWhat is it?", "a.png",
                           "missing.png", "../a.png", "/etc/hostname", "images/../../a.png", "a\x00.png", "",
                           "\ud800", "q \udced", "id-1"])
TEXT = st.one_of(st.text(max_size=12), SPECIAL)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), TEXT)
JSON = st.recursive(SCALAR, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(TEXT, inner, max_size=4)), max_leaves=16)
TURN = st.one_of(st.fixed_dictionaries({"from": st.one_of(SPECIAL, JSON), "value": st.one_of(TEXT, JSON)}), JSON)
KEYS = ("id", "image", "conversations", "prompt", "chosen", "rejected", "type", "objects")
RECORD_LIKE = st.dictionaries(st.sampled_from(KEYS), st.one_of(TEXT, st.lists(TURN, max_size=5), JSON), max_size=6)


def _mutated(base: dict):
    """A valid record with one field replaced: reaches tokenising and image loading, not only validation."""
    return st.tuples(st.sampled_from(sorted(base)), st.one_of(TEXT, JSON)).map(lambda kv: {**base, kv[0]: kv[1]})


CONVERSATION = {"id": "r0", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                                  {"from": "gpt", "value": "a red square"}]}
PREFERENCE = {"image": "a.png", "prompt": "Describe it.", "chosen": "red", "rejected": "blue"}
RECORD = st.one_of(RECORD_LIKE, JSON, _mutated(CONVERSATION), _mutated(PREFERENCE),
                   st.lists(TURN, max_size=4).map(lambda c: {**CONVERSATION, "conversations": c}))


@FUZZ
@given(rec=RECORD)
def test_a_record_validates_or_raises_data_error(rec):
    for check in (validate_conversation, validate_preference):
        try:
            check(rec, "d.json: record 0")
        except DataError as e:
            assert "\n" not in str(e) or "\n" in json.dumps(rec)  # only the record's own text can add a line


@FUZZ
@given(value=st.one_of(st.lists(RECORD, max_size=4), JSON))
def test_a_data_file_parses_or_raises_data_error(value):
    text = json.dumps(value)
    for jsonl, content in ((False, text), (True, text), (True, "\n".join(json.dumps(v) for v in
                                                                          (value if isinstance(value, list) else [value])))):
        try:
            records = parse_records(content, "d.jsonl" if jsonl else "d.json", jsonl=jsonl)
        except DataError:
            continue
        assert isinstance(records, list) and all(isinstance(r, dict) for r in records)


@pytest.fixture(scope="module")
def folder():
    """A data folder with images/a.png, shared by every example (the fuzz writes only its data file)."""
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "images").mkdir()
        Image.new("RGB", (8, 8), (255, 0, 0)).save(Path(d) / "images" / "a.png")
        yield Path(d)


@FUZZ
@given(records=st.lists(RECORD, min_size=1, max_size=3))
def test_datasets_load_and_build_samples_or_raise_data_error(folder, tiny_config, tiny_tokenizer, records):
    path = folder / "d.json"
    path.write_text(json.dumps(records))
    for kind in (ConversationDataset, PreferenceDataset):
        try:
            ds = kind(path, None, tiny_tokenizer, tiny_config)
            for i in range(len(ds)):
                ds[i]
        except DataError:
            pass
