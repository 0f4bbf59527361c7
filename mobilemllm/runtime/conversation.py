"""A conversation's token ids, built as training builds them.

The first turn is the manifest's prompt (its segments, as the apps build it). Each later turn follows the
manifest's ``prompt.follow_up``, which export writes from the template exactly as training writes a
multi-turn record: the previous answer (with the template's answer prefix), the end-of-turn token, then
the next question's turn text. For the vicuna templates that is
``<prompt> ASSISTANT: a1</s> USER: q2 ASSISTANT:``, each text segment tokenized on its own. A bundle
written before manifests recorded ``follow_up`` gets the same from its template (``mobilemllm.templates``).
"""

from __future__ import annotations

from typing import Any, Sequence

from mobilemllm.bundle import QUESTION, prompt_token_ids
from mobilemllm.data.tokenizer import encode_segments
from mobilemllm.errors import UserError
from mobilemllm.templates import IMAGE, get_template


def template_follow_up_ids(template_name: str, tokenizer, answer: str, question: str) -> list[int]:
    """The follow-up ids from the template itself: the segments training makes for a two-turn record,
    minus the first turn's prompt and the last answer."""
    tpl = get_template(template_name)
    if tpl.caption_only:
        raise UserError(f"this bundle's template {template_name!r} captions an image and has no chat turns; "
                        "ask about a new image instead of following up")
    segments = tpl.segments([(f"{IMAGE}\nq", answer), (question, "")])
    first_answer = next(i for i, (_, is_answer) in enumerate(segments) if is_answer)
    ids, _ = encode_segments(tokenizer, segments[first_answer:-1], 0, add_bos=False)
    return ids


def follow_up_ids(manifest: dict[str, Any], tokenizer, answer: str, question: str) -> list[int]:
    """Ids after a turn's prompt: the previous ``answer`` + end of turn + the turn asking ``question``."""
    prompt = manifest["prompt"]
    if "follow_up" not in prompt:
        return template_follow_up_ids(prompt["template"], tokenizer, answer, question)
    fu = prompt["follow_up"]
    if fu is None:
        raise UserError(f"this bundle's template {prompt['template']!r} has no chat turns; ask about a new "
                        "image instead of following up")
    texts = [fu["answer"].replace("{answer}", answer.strip()), fu["end_of_turn"]]
    texts += [seg["text"].replace(QUESTION, question.strip()) for seg in fu["segments"]]
    return [int(i) for text in texts if text for i in tokenizer.encode(text, add_special_tokens=False)]


def conversation_ids(manifest: dict[str, Any], tokenizer, turns: Sequence[tuple[str, str]], question: str) -> list[int]:
    """Token ids of ``turns`` (question, answer) and then ``question``, up to where the next answer starts;
    IMAGE_TOKEN_ID marks the visual-token positions."""
    if not isinstance(question, str) or not question.strip():
        raise UserError("the question is empty; ask something about the image")
    questions = [q for q, _ in turns] + [question]
    ids = prompt_token_ids(manifest["prompt"], tokenizer, questions[0], manifest["tokenizer"]["bos_id"])
    for (_, answer), nxt in zip(turns, questions[1:]):
        ids += follow_up_ids(manifest, tokenizer, answer, nxt)
    return ids
