"""A stand-in tokenizer for presets with random weights (benchmarks): byte-level BPE with exactly
``vocab_size`` ids, so every id a random model samples decodes (in Python and in ExecuTorch's C++ runner)."""

from __future__ import annotations


def synthetic_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mobilemllm.data.tokenizer import BOS, EOS, PAD, UNK

    specials = [UNK, BOS, EOS, PAD]
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(specials + alphabet)}
    # filler tokens: two-byte pieces from the byte alphabet ("ĠĠ", "Ġa", ...), decodable, never merged
    i = 0
    while len(vocab) < vocab_size:
        a, b = alphabet[i // len(alphabet) % len(alphabet)], alphabet[i % len(alphabet)]
        vocab.setdefault(a + b + ("" if i < len(alphabet) ** 2 else str(i)), len(vocab))
        i += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(specials)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                                   clean_up_tokenization_spaces=False)
