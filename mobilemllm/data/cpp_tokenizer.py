"""Keep a tokenizer inside what ExecuTorch's C++ HF tokenizer (``pytorch_tokenizers``, what the runner and the
apps load from a bundle's ``tokenizer.json``) can read, with the same ids in Python and C++.

LLaMA-style sentencepiece tokenizers (MobileLLaMA's, with byte fallback) convert in transformers to a
``Metaspace`` pre-tokenizer, which pytorch_tokenizers 1.5 refuses ("Unsupported PreTokenizer type:
Metaspace"). ``Metaspace(split=False)`` is rewritten as normalizers it does read: spaces to ``▁``, then ``▁``
prepended unless the text already starts with one. Both sides then apply it to every piece of text between
special tokens: the same ids as before for any text without special tokens in it (each prompt segment, each
answer), and a ``▁`` also after a special token inside one text, where Metaspace's ``prepend_scheme: first``
left it out; so ``"<s>" + segment`` gives ``bos`` plus the segment's own ids, as training made them.

The C++ runner decodes one token at a time, so a final ``Strip`` decoder would cut every word's leading space
in the apps' text; it is dropped: a decoded answer keeps its leading space, which every reader strips.
"""

from __future__ import annotations

import json
from typing import Any

from tokenizers import Tokenizer


def cpp_compatible_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """A tokenizer.json dict rewritten into the subset the C++ tokenizer reads (unchanged if already there)."""
    spec = json.loads(json.dumps(spec))
    pre = spec.get("pre_tokenizer")
    if isinstance(pre, dict) and pre.get("type") == "Metaspace" and pre.get("split", True) is False:
        spec["pre_tokenizer"] = None
        spec["normalizer"] = _sequence(spec.get("normalizer"), _metaspace_normalizers(pre))
    spec["decoder"] = _per_token_decoder(spec.get("decoder"), bool((spec.get("model") or {}).get("byte_fallback")))
    return spec


def _metaspace_normalizers(pre: dict[str, Any]) -> list[dict[str, Any]]:
    """Metaspace(split=False) as normalizers: replace spaces, prepend the replacement unless already there."""
    rep = pre.get("replacement", "\u2581")
    scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
    out = [{"type": "Replace", "pattern": {"String": " "}, "content": rep}]
    if scheme != "never":
        out += [{"type": "Prepend", "prepend": rep},
                {"type": "Replace", "pattern": {"Regex": "^" + rep + rep}, "content": rep}]  # it was already there
    return out


def _sequence(first: dict[str, Any] | None, more: list[dict[str, Any]]) -> dict[str, Any]:
    items = [] if first is None else (first["normalizers"] if first.get("type") == "Sequence" else [first])
    return {"type": "Sequence", "normalizers": items + more}


def _per_token_decoder(dec: dict[str, Any] | None, byte_fallback: bool) -> dict[str, Any] | None:
    """The decoder without its leading-space ``Strip`` (a Metaspace decoder becomes Replace + ByteFallback + Fuse)."""
    if not isinstance(dec, dict):
        return dec
    if dec.get("type") == "Metaspace":
        rep = dec.get("replacement", "\u2581")
        parts = [{"type": "Replace", "pattern": {"String": rep}, "content": " "}]
        return {"type": "Sequence", "decoders": parts + ([{"type": "ByteFallback"}] if byte_fallback else [])
                + [{"type": "Fuse"}]}
    if dec.get("type") == "Sequence":
        parts = [d for d in dec.get("decoders", []) if not _leading_strip(d)]
        return {**dec, "decoders": parts}
    return dec


def _leading_strip(dec: dict[str, Any]) -> bool:
    return dec.get("type") == "Strip" and int(dec.get("start", 0)) > 0 and int(dec.get("stop", 0)) == 0


def cpp_compatible(tokenizer):
    """``tokenizer`` itself when its tokenizer.json is already readable by the C++ tokenizer; otherwise a
    ``PreTrainedTokenizerFast`` over the rewritten one, with the same special tokens.

    A generic fast tokenizer, not the original class: transformers' ``LlamaTokenizer`` rebuilds its Metaspace
    pre-tokenizer when it loads, whatever its tokenizer.json says.
    """
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    new = cpp_compatible_spec(spec)
    if new == spec:
        return tokenizer
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    specials = {n: str(getattr(tokenizer, n)) for n in names if getattr(tokenizer, n, None) is not None}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(new)),
                                   clean_up_tokenization_spaces=False,
                                   model_max_length=tokenizer.model_max_length, **specials)
