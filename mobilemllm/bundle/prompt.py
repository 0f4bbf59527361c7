"""The prompt a bundle's manifest describes, filled in and tokenized as the runners and apps do."""

from __future__ import annotations

from typing import Any, Mapping

from mobilemllm.bundle.layout import IMAGE_TOKEN_ID, QUESTION


def fill_prompt(prompt: Mapping[str, Any], question: str) -> list[dict[str, str]]:
    """The manifest's segments with the question filled in: [{"type": "text", "text": ...}, {"type": "image"}]."""
    out = []
    for seg in prompt["segments"]:
        if seg["type"] == "text":
            out.append({"type": "text", "text": seg["text"].replace(QUESTION, question.strip())})
        else:
            out.append(dict(seg))
    return out


def needs_bos_token(prompt: Mapping[str, Any]) -> bool:
    """True when the runner must prefill BOS as a token (the prompt starts with the image)."""
    return bool(prompt["add_bos"] and not prompt.get("bos_in_first_text", False))


def prompt_token_ids(prompt: Mapping[str, Any], tokenizer, question: str, bos_id: int | None) -> list[int]:
    """Token ids the manifest's prompt gives, with IMAGE_TOKEN_ID (-200) at the visual-token positions."""
    ids: list[int] = [bos_id] if needs_bos_token(prompt) and bos_id is not None else []
    for seg in fill_prompt(prompt, question):
        if seg["type"] == "image":
            ids += [IMAGE_TOKEN_ID] * prompt["num_visual_tokens"]
        else:
            ids += tokenizer.encode(seg["text"], add_special_tokens=False)
    return ids
