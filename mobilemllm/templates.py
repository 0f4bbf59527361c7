"""Prompt templates (the conversation formats training and every runner share): the one home of a template's text.

A template turns turns into *segments*: ``(text, is_answer)`` pairs plus one ``IMAGE`` marker. The
tokenizer encodes each segment on its own (as ExecuTorch's MultimodalRunner encodes each text input
on its own), so training, eager generation and every exported runner build the exact same ids.

- ``plain`` (alignment pretraining, as LLaVA/MobileVLM): ``<image>`` then the caption.
- ``vicuna_v1`` (instruction tuning, chat): "<system> USER: <image>\\n<question> ASSISTANT: <answer></s>".
- ``vicuna_short_qfirst``: the first question *before* the image ("<system> USER: <question>\\n<image>\\n
  ASSISTANT:"), whatever the data's ``<image>`` placement. Causal attention then lets every visual token
  see the question, so it can compare its own content with the object asked about; with the image first,
  a small LLM has to find the matching visual token from the answer position, a content-keyed look-up
  the tiny model does not learn in its budget (docs/training.md). Later turns are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from mobilemllm.errors import ConfigError

IMAGE = "<image>"


@dataclass(frozen=True)
class Template:
    name: str
    system: str
    user: str
    assistant: str
    answer_prefix: str  # text before each answer (part of the prompt, not the target)
    caption_only: bool = False  # plain: no roles, the first gpt turn is the target
    question_first: bool = False  # the first question goes before the image

    def prompt_prefix(self) -> str:
        """Text before the image in a generation prompt."""
        if self.caption_only:
            return ""
        return f"{self.system} {self.user}: " if self.system else f"{self.user}: "

    def prompt_suffix(self, question: str) -> str:
        """Text after the image in a generation prompt, up to where the answer starts."""
        if self.caption_only:
            return ""
        if self.question_first:
            return f"\n{self.assistant}:"
        return f"\n{question.strip()} {self.assistant}:"

    def _first_turn(self, question: str) -> list[tuple[str, bool]]:
        """Prompt segments of the first turn: text, IMAGE, text (the answer not included)."""
        if self.question_first:
            return [(self.prompt_prefix() + question.strip() + "\n", False), (IMAGE, False),
                    (self.prompt_suffix(question), False)]
        return [(self.prompt_prefix(), False), (IMAGE, False), (self.prompt_suffix(question), False)]

    def segments(self, turns: list[tuple[str, str]]) -> list[tuple[str, bool]]:
        """(human, gpt) turns -> [(text, is_answer)], with IMAGE as its own segment.

        The image must be in the first human turn (LLaVA's ``<image>\\n`` prefix, or anywhere in it).
        Answers do not include the EOS token: the tokenizer wrapper appends it to answer segments.
        """
        out: list[tuple[str, bool]] = []
        for i, (human, gpt) in enumerate(turns):
            if self.caption_only:
                if i == 0:
                    out.append((IMAGE, False))
                    out.append((gpt.strip(), True))
                    continue
                out.append((human.strip(), False))
                out.append((gpt.strip(), True))
                continue
            q = human
            if i == 0:
                before, _, after = q.partition(IMAGE)
                text = before.strip()
                if self.question_first:
                    out.extend(self._first_turn(" ".join(t for t in (text, after.strip()) if t)))
                else:
                    out.append((self.prompt_prefix() + (text + " " if text else ""), False))
                    out.append((IMAGE, False))
                    out.append((self.prompt_suffix(after), False))
            else:
                out.append((f" {self.user}: {q.strip()} {self.assistant}:", False))
            out.append((self.answer_prefix + gpt.strip(), True))
        return out

    def prompt_segments(self, question: str) -> list[tuple[str, bool]]:
        """Segments for a single-turn generation prompt about one image (no answer)."""
        if self.caption_only:
            return [(IMAGE, False)]
        return self._first_turn(question)


TEMPLATES: dict[str, Template] = {
    "plain": Template("plain", system="", user="", assistant="", answer_prefix="", caption_only=True),
    "vicuna_v1": Template(
        "vicuna_v1",
        system="A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        user="USER",
        assistant="ASSISTANT",
        answer_prefix=" ",
    ),
    # The same chat layout with a one-line system prompt: fewer tokens for the tiny model's small context.
    "vicuna_short": Template("vicuna_short", system="A chat about an image.", user="USER", assistant="ASSISTANT",
                             answer_prefix=" "),
    "vicuna_short_qfirst": Template("vicuna_short_qfirst", system="A chat about an image.", user="USER",
                                    assistant="ASSISTANT", answer_prefix=" ", question_first=True),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ConfigError(f"unknown template {name!r}; valid templates: {', '.join(sorted(TEMPLATES))}")
    return TEMPLATES[name]
