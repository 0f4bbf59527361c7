"""LLaVA-format datasets: conversations and preference pairs over an image folder.

Conversation record (JSON list or JSONL, one per line)::

    {"id": "0001", "image": "0001.png",
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is ...?"},
                       {"from": "gpt", "value": "red"}, ...]}

Preference record (DPO)::

    {"id": "0001", "image": "0001.png", "prompt": "Describe the image.", "chosen": "...", "rejected": "..."}

Records are validated when the file is read; an error names the file, the record and the field. Files
must be UTF-8 (a byte-order mark is allowed). ``.jsonl`` files hold one record per line, any other file
one JSON list.

Image names are paths relative to the image folder (default: ``images/`` beside the data file). A name
that leaves that folder (absolute, ``..``, or a symlink whose target lies outside) is refused unless
``allow_outside_images`` is set (``--allow-outside-images`` on the command line): a data set downloaded
from elsewhere should not make training read arbitrary files of this machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mobilemllm.bundle.layout import IGNORE_INDEX
from mobilemllm.config import ModelConfig
from mobilemllm.data.images import load_image, preprocess
from mobilemllm.data.tokenizer import check_text, encode_segments
from mobilemllm.errors import DataError
from mobilemllm.templates import IMAGE, Template, get_template

HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant")


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON list or a JSONL file of records, with one ``DataError`` line for anything unreadable."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file not found: {path}")
    if not path.is_file():  # a folder fails late; a FIFO would block the read forever
        raise DataError(f"data file {path} is not a regular file; give a .json or .jsonl file")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}: not UTF-8 text (byte {data[e.start:e.start + 1]!r} at line {line}, offset "
                        f"{e.start}); save the file as UTF-8") from None
    return parse_records(text, path, jsonl=path.suffix == ".jsonl")


def parse_records(text: str, path: str | Path, jsonl: bool = False) -> list[dict[str, Any]]:
    """The records of a data file's text: a JSON list of objects, or (``jsonl``) one object per line."""
    if jsonl:
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            records.append(_loads(line, f"{path}: line {n}"))
    else:
        records = _loads(text, str(path), whole_file=True)
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of records (LLaVA format), got {type(records).__name__}")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise DataError(f"{path}: record {i} is a {type(r).__name__}, expected an object")
    return records


def _loads(text: str, where: str, whole_file: bool = False) -> Any:
    """json.loads with one-line errors; also for input that breaks the parser itself (deep nesting, huge
    integers), not only for syntax errors."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        if not whole_file:
            raise DataError(f"{where} is not valid JSON ({e.msg})") from None
        hint = (" (one record per line is a JSON Lines file: name it .jsonl)" if e.msg == "Extra data"
                else "; expected a list of records in the LLaVA format")
        raise DataError(f"{where}: not valid JSON ({e.msg} at line {e.lineno}){hint}") from None
    except (ValueError, RecursionError) as e:
        detail = " ".join(str(e).split())[:80]
        raise DataError(f"{where}: cannot be read as JSON ({e.__class__.__name__}: {detail})") from None


def _short(value: Any, n: int = 40) -> str:
    """A value for an error line: its repr, cut to ``n`` characters."""
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."


def _where(path: Path, i: int, rec: dict) -> str:
    rid = rec.get("id")
    return f"{path}: record {i}" + (f" (id {_short(rid)})" if rid is not None else "")


def validate_conversation(rec: dict, where: str) -> list[tuple[str, str]]:
    """Check one LLaVA record; return its (human, gpt) turns."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record must be a JSON object, not {type(rec).__name__}")
    conv = rec.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise DataError(f"{where}: field 'conversations' must be a non-empty list of {{from, value}} turns")
    turns: list[tuple[str, str]] = []
    for j, turn in enumerate(conv):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: conversations[{j}] needs 'from' and 'value'")
        if not isinstance(turn["value"], str):
            raise DataError(f"{where}: conversations[{j}].value must be a string, not {type(turn['value']).__name__}")
        check_text(turn["value"], f"{where}: conversations[{j}].value")
        want = HUMAN_ROLES if j % 2 == 0 else GPT_ROLES
        if not isinstance(turn["from"], str) or turn["from"] not in want:
            raise DataError(f"{where}: conversations[{j}].from is {_short(turn['from'])}, expected one of {want} "
                            "(turns must alternate human, gpt)")
    if len(conv) % 2:
        raise DataError(f"{where}: conversations end with a human turn; each question needs a gpt answer")
    for j in range(0, len(conv), 2):
        turns.append((conv[j]["value"], conv[j + 1]["value"]))
    if "image" in rec:
        if not isinstance(rec["image"], str) or not rec["image"]:
            raise DataError(f"{where}: field 'image' must be a file name, not {_short(rec['image'])}")
        if IMAGE not in turns[0][0]:
            raise DataError(f"{where}: the first human turn has no '{IMAGE}' placeholder for the record's image")
        if sum(h.count(IMAGE) for h, _ in turns) != 1:
            raise DataError(f"{where}: exactly one '{IMAGE}' placeholder is supported per conversation")
    return turns


def validate_preference(rec: dict, where: str) -> None:
    """Check one preference (DPO) record: image, prompt, chosen and rejected non-empty strings."""
    if not isinstance(rec, dict):
        raise DataError(f"{where}: a record must be a JSON object, not {type(rec).__name__}")
    for key in ("image", "prompt", "chosen", "rejected"):
        if not isinstance(rec.get(key), str) or not rec.get(key):
            raise DataError(f"{where}: field {key!r} is missing or not a non-empty string "
                            "(preference records need image, prompt, chosen, rejected)")
        check_text(rec[key], f"{where}: field {key!r}")


OUTSIDE_HINT = "pass --allow-outside-images (allow_outside_images=True) to use images outside it"


def check_image_name(name: Any, where: str, *, allow_outside: bool = False) -> None:
    """Refuse an image name that is not a relative path inside the image folder (checked on the text
    alone, so a whole data file is checked before any work starts; ``image_path`` also follows symlinks)."""
    if not isinstance(name, str) or not name:
        raise DataError(f"{where}: field 'image' must be a file name, not {_short(name)}")
    if "\0" in name:
        raise DataError(f"{where}: image name {_short(name)} contains a NUL character")
    check_text(name, f"{where}: image name")
    if allow_outside:
        return
    p = Path(name)
    if p.is_absolute() or p.drive or name.startswith(("/", "\\")):
        raise DataError(f"{where}: image {_short(name)} is an absolute path; image names must be relative to "
                        f"the image folder ({OUTSIDE_HINT})")
    if ".." in p.parts or ".." in name.split("\\"):
        raise DataError(f"{where}: image {_short(name)} climbs out of the image folder with '..'; image names "
                        f"must be relative paths inside it ({OUTSIDE_HINT})")


def image_path(folder: str | Path, name: Any, where: str, *, allow_outside: bool = False) -> Path:
    """The file of image ``name`` in ``folder``; refused if it lies outside ``folder`` once symlinks are
    followed (unless ``allow_outside``)."""
    check_image_name(name, where, allow_outside=allow_outside)
    folder = Path(folder)
    path = folder / name
    if not allow_outside:
        try:
            root, real = folder.resolve(), path.resolve()
        except (OSError, RuntimeError) as e:  # a symlink loop, a name too long
            raise DataError(f"{where}: cannot resolve image {_short(name)}: {e}") from None
        if not real.is_relative_to(root):
            raise DataError(f"{where}: image {_short(name)} is a link to {real}, outside the image folder "
                            f"{folder} ({OUTSIDE_HINT})")
    return path


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]
    pixel_values: torch.Tensor | None


class ConversationDataset(torch.utils.data.Dataset):
    """LLaVA conversations -> tokenised samples with labels on the answers only."""

    def __init__(self, path: str | Path, image_folder: str | Path | None, tokenizer, config: ModelConfig,
                 template: str | Template | None = None, max_length: int | None = None,
                 allow_outside_images: bool = False):
        self.path = Path(path)
        self.image_folder = Path(image_folder) if image_folder else self.path.parent / "images"
        self.tokenizer = tokenizer
        self.config = config
        self.template = template if isinstance(template, Template) else get_template(template or config.template)
        self.max_length = max_length or config.llm.max_position_embeddings
        self.allow_outside_images = allow_outside_images
        self.records = read_records(self.path)
        self.turns = [validate_conversation(r, _where(self.path, i, r)) for i, r in enumerate(self.records)]
        for i, r in enumerate(self.records):
            if "image" in r:
                check_image_name(r["image"], _where(self.path, i, r), allow_outside=allow_outside_images)
        self._image_cache: dict[str, torch.Tensor] = {}
        self._token_cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.records)

    @property
    def lengths(self) -> list[int]:
        """A cheap length per sample for length-grouped batching: characters of its text, plus the visual
        tokens if it has an image (proportional to the token count, without tokenising)."""
        if not hasattr(self, "_lengths"):
            vis = self.config.num_visual_tokens
            self._lengths = [sum(len(a) + len(b) for a, b in turns) + (vis if "image" in rec else 0)
                             for rec, turns in zip(self.records, self.turns)]
        return self._lengths

    def image(self, name: str, where: str = "") -> torch.Tensor:
        if name not in self._image_cache:
            path = image_path(self.image_folder, name, where, allow_outside=self.allow_outside_images)
            self._image_cache[name] = preprocess(load_image(path), self.config.vision)
        return self._image_cache[name]

    # samples whose tokens are kept (about 2.4 MB per 1000 samples of 300 tokens): the tiny world's 57k
    # questions and conversations all fit; a one-epoch run over a large set gains nothing from keeping them
    TOKEN_CACHE_SAMPLES = 200_000

    def tokens(self, i: int) -> tuple[list[int], list[int]]:
        """Sample ``i``'s token ids and labels, tokenised on first use only: the tiny recipe reads each sample
        about thirty times, and tokenising it on every read cost about a tenth of a training step (profiled
        on the instruct stage); kept as int32 arrays, a fraction of the memory of lists."""
        cached = self._token_cache.get(i)
        if cached is None:
            rec = self.records[i]
            segments = self.template.segments(self.turns[i])
            if "image" not in rec:
                segments = [(t, a) for t, a in segments if t != IMAGE]
            ids, labels = encode_segments(self.tokenizer, segments, self.config.num_visual_tokens)
            if len(ids) > self.max_length:
                raise DataError(f"{_where(self.path, i, rec)}: {len(ids)} tokens (with visual tokens) exceed the "
                                f"context of {self.max_length}; shorten it or raise llm.max_position_embeddings")
            if len(self._token_cache) >= self.TOKEN_CACHE_SAMPLES:
                return ids, labels
            cached = self._token_cache[i] = (np.asarray(ids, dtype=np.int32), np.asarray(labels, dtype=np.int32))
        return cached[0].tolist(), cached[1].tolist()

    def __getitem__(self, i: int) -> Sample:
        rec = self.records[i]
        ids, labels = self.tokens(i)
        where = _where(self.path, i, rec)
        try:
            pix = self.image(rec["image"], where) if "image" in rec else None
        except DataError as e:  # say which record points at the bad image
            raise DataError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        return Sample(ids, labels, pix)


class PreferenceDataset(torch.utils.data.Dataset):
    """DPO pairs: each item is (chosen Sample, rejected Sample) sharing the prompt and image."""

    def __init__(self, path: str | Path, image_folder: str | Path | None, tokenizer, config: ModelConfig,
                 template: str | None = None, allow_outside_images: bool = False):
        self.path = Path(path)
        self.image_folder = Path(image_folder) if image_folder else self.path.parent / "images"
        self.tokenizer = tokenizer
        self.config = config
        self.template = get_template(template or config.template)
        self.allow_outside_images = allow_outside_images
        self.records = read_records(self.path)
        for i, r in enumerate(self.records):
            validate_preference(r, _where(self.path, i, r))
            check_image_name(r["image"], _where(self.path, i, r), allow_outside=allow_outside_images)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[Sample, Sample]:
        rec = self.records[i]
        where = _where(self.path, i, rec)
        try:
            path = image_path(self.image_folder, rec["image"], where, allow_outside=self.allow_outside_images)
            pix = preprocess(load_image(path), self.config.vision)
        except DataError as e:  # say which record points at the bad image
            raise DataError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None
        out = []
        for key in ("chosen", "rejected"):
            turns = [(f"{IMAGE}\n{rec['prompt']}", rec[key])]
            ids, labels = encode_segments(self.tokenizer, self.template.segments(turns),
                                          self.config.num_visual_tokens)
            out.append(Sample(ids, labels, pix))
        return out[0], out[1]


def collate(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; images stacked for the rows that have them."""
    n = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), n), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(samples), n), dtype=torch.long)
    for r, s in enumerate(samples):
        ids[r, : len(s.input_ids)] = torch.tensor(s.input_ids)
        labels[r, : len(s.labels)] = torch.tensor(s.labels)
        mask[r, : len(s.input_ids)] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    pix = [s.pixel_values for s in samples if s.pixel_values is not None]
    if pix:
        batch["pixel_values"] = torch.stack(pix)
    return batch
