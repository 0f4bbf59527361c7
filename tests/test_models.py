"""The model: connectors, vision tower, the VLM (splicing, parity with transformers' LLaMA, loss masking,
generation with and without the KV cache, freezing), and checkpoint folders."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import make_tiny_config, make_tiny_model
from mobilemllm.config import ConnectorConfig
from mobilemllm.templates import get_template
from mobilemllm.data.dataset import Sample, collate
from mobilemllm.data.tokenizer import encode_segments
from mobilemllm.errors import CheckpointError, UserError
from mobilemllm.inference import answer, prompt_ids
from mobilemllm.models.checkpoint import (WEIGHTS_NAME, check_checkpoint_dir, load_checkpoint, record_run_stage,
                                         save_checkpoint)
from mobilemllm.models.connectors import CONNECTORS, build_connector, output_tokens
from mobilemllm.models.vlm import shared_prefix_length
from mobilemllm.training.losses import LMObjective
from mobilemllm.training.trainer import enable_gradient_checkpointing
from mobilemllm.bundle.layout import IGNORE_INDEX, IMAGE_TOKEN_ID

QUESTIONS = ["What colour is the circle?", "Describe the image in detail.", "How many shapes are there?"]


def pixels(cfg, batch: int = 1, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    s = cfg.vision.image_size
    return torch.randn(batch, cfg.vision.num_views, 3, s, s, generator=g)


def chat_sample(cfg, tok, turns=(("<image>\nWhat colour is the circle?", "red"),)):
    segments = get_template(cfg.template).segments(list(turns))
    ids, labels = encode_segments(tok, segments, cfg.num_visual_tokens)
    return torch.tensor([ids]), torch.tensor([labels])


# ------------------------------------------------------------------------------------ connectors


@pytest.mark.parametrize("kind", sorted(CONNECTORS))
def test_connector_output_shape_and_token_count(kind):
    cfg = ConnectorConfig(kind=kind, num_queries=20, num_heads=4)
    torch.manual_seed(0)
    conn = build_connector(cfg, 32, 48).eval()
    with torch.no_grad():
        y = conn(torch.randn(2, 576, 32))  # a 24 x 24 patch grid, as CLIP-L/14 at 336 px
    expected = {"mlp2x_gelu": 576, "ldp": 144, "ldpv2": 144, "patch_merger": 144, "resampler": 20}[kind]
    assert output_tokens(cfg, 576) == expected
    assert y.shape == (2, expected, 48)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("pool,side", [(2, 6), (3, 6), (4, 8)])
def test_ldpv2_pools_blocks_in_row_major_order(pool, side):
    cfg = ConnectorConfig(kind="ldpv2", pool=pool)
    conn = build_connector(cfg, 8, 8)
    conn.mlp = torch.nn.Identity()  # isolate the spatial part: pooling + PEG
    with torch.no_grad():
        conn.peg.peg[0].weight.zero_()
        conn.peg.peg[0].bias.zero_()  # PEG(x) = x + conv(x) = x
        x = torch.randn(1, side * side, 8)
        y = conn(x)
    grid, n = x.reshape(side, side, 8), side // pool
    want = torch.stack([grid[pool * r:pool * (r + 1), pool * c:pool * (c + 1)].mean((0, 1))
                        for r in range(n) for c in range(n)])
    torch.testing.assert_close(y[0], want)
    assert output_tokens(cfg, side * side) == n * n


def test_ldpv2_pool_must_divide_the_patch_grid():
    from mobilemllm.config import ConfigError

    assert make_tiny_config(connector={"pool": 4}).num_visual_tokens == 4  # 8 x 8 patches -> 2 x 2
    with pytest.raises(ConfigError, match="connector.pool 3"):
        make_tiny_config(connector={"pool": 3})


@pytest.mark.parametrize("pool,side", [(2, 4), (2, 6), (3, 6)])
def test_patch_merger_concatenates_blocks_in_row_major_order(pool, side):
    """patch_merger (Qwen2-VL's merger): each pool x pool block of normed patches concatenated, row-major
    inside the block and across blocks, then the MLP; the layout inside a block is kept (unlike pooling)."""
    cfg = ConnectorConfig(kind="patch_merger", pool=pool)
    conn = build_connector(cfg, 8, 16)
    conn.mlp = torch.nn.Identity()
    with torch.no_grad():
        x = torch.randn(2, side * side, 8)
        y = conn(x)
    grid, n = torch.nn.functional.layer_norm(x, (8,)).reshape(2, side, side, 8), side // pool
    want = torch.stack([torch.cat([grid[:, pool * r + i, pool * c + j] for i in range(pool) for j in range(pool)], -1)
                        for r in range(n) for c in range(n)], 1)
    torch.testing.assert_close(y, want)
    assert output_tokens(cfg, side * side) == n * n
    swapped = x.clone()  # two patches of one block exchanged: average pooling could not tell, the merger does
    swapped[:, [0, 1]] = swapped[:, [1, 0]]
    with torch.no_grad():
        assert not torch.allclose(conn(swapped)[:, 0], y[:, 0])


def test_patch_merger_in_the_model_and_its_exports(tmp_path, tiny_tokenizer):
    from mobilemllm.config import ConfigError
    from mobilemllm.export.export_llama import VisionEncoder
    from mobilemllm.export.onnx import VisionGraph

    cfg = make_tiny_config(vision={"patch_size": 8}, connector={"kind": "patch_merger", "output_norm": True})
    assert cfg.num_visual_tokens == 4  # 4 x 4 patches of 8 px -> 2 x 2 tokens
    loaded, _ = load_checkpoint(save_checkpoint(make_tiny_model(cfg, seed=5), tiny_tokenizer, tmp_path / "ckpt"))
    assert loaded.config.connector.kind == "patch_merger"
    image = torch.randint(0, 256, (1, 3, cfg.vision.image_size, cfg.vision.image_size), dtype=torch.uint8)
    with torch.no_grad():
        want = loaded.encode_images((image.float() / 255.0 - 0.5) / 0.5)
        exported = torch.export.export(VisionEncoder(loaded).eval(), (image,), strict=True).module()(image)
        onnx_graph = VisionGraph(loaded).eval()(image)
    assert want.shape == (1, 4, cfg.llm.hidden_size)
    assert torch.allclose(exported, want, atol=1e-4) and torch.allclose(onnx_graph, want, atol=1e-4)
    from mobilemllm.export.coreml import convert_vision, mil_op_types

    ops = mil_op_types(convert_vision(loaded).get_spec())  # converts (ranks <= 4); predicting needs macOS
    assert ops.get("gelu") and ops.get("transpose")
    with pytest.raises(ConfigError, match="connector.pool 3"):
        make_tiny_config(connector={"kind": "patch_merger", "pool": 3})


def test_connectors_reject_non_square_grids():
    conn = build_connector(ConnectorConfig(kind="ldpv2"), 8, 8)
    with pytest.raises(ValueError, match="square"):
        conn(torch.randn(1, 35, 8))


def test_connector_parameter_counts_at_mobilevlm_width():
    """MobileVLM's projectors from CLIP-L (1024) into MobileLLaMA-1.4B (2048): LDP ~18.9M, LDPv2 ~6.3M."""
    counts = {}
    with torch.device("meta"):  # no memory, instant
        for kind in ("ldp", "ldpv2", "mlp2x_gelu"):
            counts[kind] = sum(p.numel() for p in build_connector(ConnectorConfig(kind=kind), 1024, 2048).parameters())
    assert round(counts["ldp"] / 1e6, 1) == 18.9, counts
    assert round(counts["ldpv2"] / 1e6, 1) == 6.3, counts
    assert counts["mlp2x_gelu"] == 1024 * 2048 + 2048 + 2048 * 2048 + 2048


# -------------------------------------------------------------------------------------- the VLM


def test_llm_path_matches_transformers_llama_on_spliced_embeddings(tiny_tokenizer):
    """Our forward == transformers' LlamaForCausalLM, configured here by hand, on embeddings built here by
    concatenating text embeddings and connector outputs. Covers the config mapping (GQA, RoPE theta, eps)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = make_tiny_config(llm={"num_kv_heads": 1, "rope_theta": 777.0, "rms_norm_eps": 1e-5,
                                "tie_word_embeddings": False})
    model = make_tiny_model(cfg, seed=1)

    def reference(rope_theta: float):
        torch.manual_seed(123)
        ref = LlamaForCausalLM(LlamaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=256, rope_theta=rope_theta, rms_norm_eps=1e-5,
            tie_word_embeddings=False, hidden_act="silu", attn_implementation="eager"))
        ref.load_state_dict(model.llm.state_dict())
        return ref.eval()

    ids = prompt_ids(cfg, tiny_tokenizer, QUESTIONS[0])
    n = cfg.num_visual_tokens
    start = ids.index(IMAGE_TOKEN_ID)
    assert ids[start:start + n] == [IMAGE_TOKEN_ID] * n and IMAGE_TOKEN_ID not in ids[start + n:]
    pix = pixels(cfg)
    with torch.no_grad():
        got = model(torch.tensor([ids]), pix).logits
        table = model.llm.get_input_embeddings()
        image = model.connector(model.vision(pix[:, 0]))
        emb = torch.cat([table(torch.tensor([ids[:start]])), image, table(torch.tensor([ids[start + n:]]))], 1)
        want = reference(777.0)(inputs_embeds=emb).logits
        other = reference(10000.0)(inputs_embeds=emb).logits
    assert got.shape == (1, len(ids), 512)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(got, other, atol=1e-3)  # the comparison is sensitive to the RoPE base


def test_image_embeddings_are_spliced_exactly_at_image_token_positions(tiny_model):
    cfg = tiny_model.config
    n = cfg.num_visual_tokens
    ids = torch.tensor([[1, 5, 6] + [IMAGE_TOKEN_ID] * n + [7, 8],
                        [1] + [IMAGE_TOKEN_ID] * n + [9, 10, 11, 12]])
    pix = pixels(cfg, batch=2)
    with torch.no_grad():
        emb = tiny_model.embed(ids, pix)
        images = tiny_model.encode_images(pix)
        table = tiny_model.llm.get_input_embeddings().weight
    assert images.shape == (2, n, cfg.llm.hidden_size)
    assert not torch.allclose(images[0], images[1])
    assert torch.equal(emb[0, 3:3 + n], images[0])
    assert torch.equal(emb[1, 1:1 + n], images[1])
    for row, positions in ((0, [0, 1, 2, 3 + n, 4 + n]), (1, [0, 1 + n, 2 + n, 3 + n, 4 + n])):
        for p in positions:
            assert torch.equal(emb[row, p], table[ids[row, p]])
    # a 4-D batch (one view each) is the same as a 5-D one
    with torch.no_grad():
        assert torch.equal(tiny_model.encode_images(pix[:, 0]), images)


def test_image_placeholders_must_match_the_images(tiny_model):
    n = tiny_model.config.num_visual_tokens
    pix = pixels(tiny_model.config)
    with pytest.raises(UserError, match="do not match"):
        tiny_model.embed(torch.tensor([[1] + [IMAGE_TOKEN_ID] * (n - 1) + [5]]), pix)
    with pytest.raises(UserError, match="no image"):
        tiny_model.embed(torch.tensor([[1] + [IMAGE_TOKEN_ID] * n + [5]]))
    # no placeholder, no image: plain text embeddings
    ids = torch.tensor([[1, 5, 6]])
    assert torch.equal(tiny_model.embed(ids), tiny_model.llm.get_input_embeddings()(ids))


@pytest.mark.parametrize("question", QUESTIONS)
def test_cached_and_uncached_greedy_generation_agree(tiny_model, tiny_tokenizer, question):
    cfg = tiny_model.config
    ids = torch.tensor([prompt_ids(cfg, tiny_tokenizer, question)])
    pix = pixels(cfg, seed=len(question))
    seen: list[int] = []
    cached = tiny_model.generate(ids, pix, max_new_tokens=16, use_cache=True, on_token=seen.append)
    uncached = tiny_model.generate(ids, pix, max_new_tokens=16, use_cache=False)
    assert len(cached) == 16
    assert cached == uncached
    assert seen == cached
    # greedy == argmax of one full forward at the first step
    with torch.no_grad():
        first = int(tiny_model(ids, pix).logits[0, -1].argmax())
    assert cached[0] == first
    # stops at an end-of-sequence id, which is returned
    assert tiny_model.generate(ids, pix, max_new_tokens=16, eos_ids=[cached[2]]) == cached[:cached.index(cached[2]) + 1]


@pytest.mark.parametrize("question", QUESTIONS[:2])
def test_cached_and_uncached_sampling_agree_with_a_seed(tiny_model, tiny_tokenizer, question):
    cfg = tiny_model.config
    ids = torch.tensor([prompt_ids(cfg, tiny_tokenizer, question)])
    pix = pixels(cfg)
    kw = dict(max_new_tokens=20, temperature=1.5, top_p=0.95)
    a = tiny_model.generate(ids, pix, seed=7, use_cache=True, **kw)
    b = tiny_model.generate(ids, pix, seed=7, use_cache=False, **kw)
    c = tiny_model.generate(ids, pix, seed=8, use_cache=True, **kw)
    greedy = tiny_model.generate(ids, pix, max_new_tokens=20)
    assert a == b
    assert a != c  # the seed matters
    assert a != greedy  # it really samples
    # a vanishing nucleus keeps only the most likely token: greedy again
    assert tiny_model.generate(ids, pix, max_new_tokens=20, temperature=1.0, top_p=1e-6, seed=1) == greedy


def test_loss_is_only_on_labelled_tokens(tiny_model, tiny_tokenizer):
    cfg = tiny_model.config
    ids, labels = chat_sample(cfg, tiny_tokenizer)
    pix = pixels(cfg)
    labelled = labels[0] != IGNORE_INDEX
    assert 0 < int(labelled.sum()) < ids.shape[1] - cfg.num_visual_tokens
    with torch.no_grad():
        out = tiny_model(ids, pix, labels=labels)
        logits = out.logits[0, :-1]
        target = labels[0, 1:]
        keep = target != IGNORE_INDEX
        manual = F.cross_entropy(logits[keep], target[keep])
        torch.testing.assert_close(out.loss, manual)

        # junk appended after the answer, unlabelled, changes nothing (causal + masked)
        junk = torch.tensor([[11, 12, 13, 14]])
        ids2 = torch.cat([ids, junk], 1)
        labels2 = torch.cat([labels, torch.full_like(junk, IGNORE_INDEX)], 1)
        torch.testing.assert_close(tiny_model(ids2, pix, labels=labels2).loss, out.loss, atol=1e-6, rtol=1e-6)

        # ... but changing a labelled target does
        labels3 = labels.clone()
        first = int(labelled.nonzero()[0])
        labels3[0, first] = (labels3[0, first] + 1) % cfg.llm.vocab_size
        assert not torch.isclose(tiny_model(ids, pix, labels=labels3).loss, out.loss)


@pytest.mark.parametrize("template", ["vicuna_short_qfirst", "vicuna_v1"])
def test_the_lean_forward_gives_the_same_loss_and_gradients(tiny_tokenizer, template):
    """The training objectives' lean forward: the prompt text every row begins with goes through the LLM once
    per batch and the LM head runs at the labelled positions only; the loss and every gradient equal the
    full forward's (padding, the image and each question kept per row)."""
    cfg = make_tiny_config(template=template)
    model = make_tiny_model(cfg).train()
    questions = ["What colour is the circle?", "How many shapes are there?", "Is there a blue square?"]
    samples = []
    for q, a in zip(questions, ["red", "two", "no"]):
        segments = get_template(template).segments([(f"<image>\n{q}", a)])
        ids, labels = encode_segments(tiny_tokenizer, segments, cfg.num_visual_tokens)
        samples.append(Sample(ids, labels, pixels(cfg)[0]))
    batch = collate(samples, tiny_tokenizer.pad_token_id)
    assert len({len(s.input_ids) for s in samples}) > 1  # right padding is exercised
    prefix = shared_prefix_length(batch["input_ids"], batch["attention_mask"])
    first_image = int((batch["input_ids"][0] == IMAGE_TOKEN_ID).nonzero()[0])
    assert 2 <= prefix <= first_image
    assert shared_prefix_length(batch["input_ids"][:1]) == 0

    rows_seen, head_rows = [], []
    hook = model.llm.model.layers[0].register_forward_hook(lambda m, i, o: rows_seen.append(i[0].shape[:2]))
    head_hook = model.llm.lm_head.register_forward_hook(lambda m, i, o: head_rows.append(i[0].shape[:-1]))

    def loss_and_grads(share):
        model.zero_grad()
        loss, _ = LMObjective(lean=share).loss(model, batch)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain_loss, plain_grads = loss_and_grads(False)
    shared_loss, shared_grads = loss_and_grads(True)
    hook.remove()
    head_hook.remove()
    b, t = batch["input_ids"].shape
    assert rows_seen == [(b, t), (1, prefix), (b, t - prefix)]
    labelled = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert head_rows == [(b, t), (labelled,)]  # the lean LM head: the answers' positions only
    torch.testing.assert_close(shared_loss, plain_loss, rtol=1e-5, atol=1e-6)
    assert shared_grads.keys() == plain_grads.keys() and any(n.startswith("llm.") for n in plain_grads)
    for n, g in plain_grads.items():
        torch.testing.assert_close(shared_grads[n], g, rtol=1e-4, atol=1e-6, msg=n)
    # gradient checkpointing turns the KV cache off in training: the forward then runs row by row
    enable_gradient_checkpointing(model)
    rows_seen.clear()
    hook = model.llm.model.layers[0].register_forward_hook(lambda m, i, o: rows_seen.append(i[0].shape[:2]))
    checkpointed_loss, _ = loss_and_grads(True)
    hook.remove()
    assert rows_seen[0] == (b, t)
    torch.testing.assert_close(checkpointed_loss, plain_loss, rtol=1e-5, atol=1e-6)


def test_set_trainable_freezes_exactly_the_named_parts(tiny_tokenizer):
    model = make_tiny_model()
    model.set_trainable(vision=False, connector=True, llm=False)
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert all(p.requires_grad for p in model.connector.parameters())
    assert not any(p.requires_grad for p in model.llm.parameters())
    ids, labels = chat_sample(model.config, tiny_tokenizer)
    model(ids, pixels(model.config), labels=labels).loss.backward()
    assert all(p.grad is None for p in model.vision.parameters())
    assert all(p.grad is None for p in model.llm.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.connector.parameters())

    model.set_trainable(llm=True)  # parts not named keep their state
    assert all(p.requires_grad for p in model.llm.parameters())
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert all(p.requires_grad for p in model.connector.parameters())
    with pytest.raises(UserError, match="valid parts"):
        model.set_trainable(projector=True)
    counts = model.parameter_counts()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["total"] == counts["vision"] + counts["connector"] + counts["llm"]


def test_siglip_vision_tower(tiny_tokenizer):
    cfg = make_tiny_config(vision={"kind": "siglip"})
    model = make_tiny_model(cfg)
    assert type(model.vision.model).__name__ == "SiglipVisionModel"
    pix = pixels(cfg)
    with torch.no_grad():
        feats = model.vision(pix[:, 0])
    assert feats.shape == (1, cfg.vision.num_patches, cfg.vision.hidden_size)  # no CLS token to drop
    assert cfg.num_visual_tokens == 16
    ids, labels = chat_sample(cfg, tiny_tokenizer)
    with torch.no_grad():
        assert torch.isfinite(model(ids, pix, labels=labels).loss)
    prompt = torch.tensor([prompt_ids(cfg, tiny_tokenizer, QUESTIONS[0])])
    assert model.generate(prompt, pix, max_new_tokens=8) == model.generate(prompt, pix, max_new_tokens=8,
                                                                           use_cache=False)


def test_tiles_mode_end_to_end(tiny_tokenizer, shapes_image):
    from mobilemllm.data.images import load_image, preprocess

    cfg = make_tiny_config(vision={"hires": "tiles"})
    model = make_tiny_model(cfg)
    assert cfg.num_visual_tokens == 5 * 16
    pix = preprocess(load_image(shapes_image), cfg.vision)
    assert pix.shape == (5, 3, 32, 32)
    # the global view is the whole image; tiles are its quarters, each different
    assert not torch.equal(pix[0], pix[1])
    ids = prompt_ids(cfg, tiny_tokenizer, QUESTIONS[0])
    assert ids.count(IMAGE_TOKEN_ID) == 80
    with torch.no_grad():
        images = model.encode_images(pix.unsqueeze(0))
        per_view = model.connector(model.vision(pix))
    assert images.shape == (1, 80, cfg.llm.hidden_size)
    torch.testing.assert_close(images[0], per_view.reshape(80, -1))
    out = answer(model, tiny_tokenizer, shapes_image, QUESTIONS[0], max_new_tokens=6)
    assert out.prompt_tokens == len(ids)
    assert 1 <= len(out.tokens) <= 6
    assert out.tokens == model.generate(torch.tensor([ids]), pix.unsqueeze(0), max_new_tokens=6,
                                        eos_ids=[tiny_tokenizer.eos_token_id], use_cache=False)


def test_prompt_longer_than_the_context_is_a_user_error(tiny_tokenizer, shapes_image):
    cfg = make_tiny_config(llm={"max_position_embeddings": 32})
    model = make_tiny_model(cfg)
    long_question = "What colour is the large shape in the top left corner of the picture?"
    assert len(prompt_ids(cfg, tiny_tokenizer, long_question)) > 32
    with pytest.raises(UserError, match="context is 32"):
        answer(model, tiny_tokenizer, shapes_image, long_question)
    # a prompt that fits generates only up to the end of the context
    ids = torch.tensor([[1] + [IMAGE_TOKEN_ID] * 16 + [5] * 12])  # 29 tokens
    assert len(model.generate(ids, pixels(cfg), max_new_tokens=50)) == 3


# ----------------------------------------------------------------------------------- checkpoints


def tree(path):
    return sorted(p.name for p in path.iterdir())


@pytest.mark.parametrize("kind", ["ldpv2", "mlp2x_gelu"])
def test_connector_output_norm(tmp_path, tiny_tokenizer, kind):
    """connector.output_norm: visual tokens LayerNormed with gain output_norm_gain (text-embedding scale), the
    inner connector's keys under connector.inner; saved and loaded; export wrappers include it."""
    from mobilemllm.config import ConfigError
    from mobilemllm.export.export_llama import VisionEncoder
    from mobilemllm.export.onnx import VisionGraph

    cfg = make_tiny_config(connector={"kind": kind, "output_norm": True, "output_norm_gain": 0.05})
    model = make_tiny_model(cfg, seed=4)
    pix = pixels(cfg, batch=2)
    with torch.no_grad():
        tokens = model.encode_images(pix)
        plain = model.connector.inner(model.vision(pix.flatten(0, 1)))
    assert tokens.shape == (2, cfg.num_visual_tokens, cfg.llm.hidden_size)
    assert torch.allclose(tokens, F.layer_norm(plain, plain.shape[-1:]) * 0.05, atol=1e-5)
    assert torch.allclose(tokens.norm(dim=-1), torch.full(tokens.shape[:2], 0.05 * cfg.llm.hidden_size ** 0.5),
                          rtol=1e-3)
    assert {"connector.norm.weight", "connector.norm.bias"} <= set(model.state_dict())
    assert not [k for k in model.state_dict() if k.startswith("connector.") and
                not k.startswith(("connector.norm.", "connector.inner."))]
    loaded, _ = load_checkpoint(save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt"))
    assert loaded.config.connector.output_norm and loaded.config.connector.output_norm_gain == 0.05
    image = torch.randint(0, 256, (1, 3, cfg.vision.image_size, cfg.vision.image_size), dtype=torch.uint8)
    with torch.no_grad():
        want = loaded.encode_images((image.float() / 255.0 - 0.5) / 0.5)
        exported = torch.export.export(VisionEncoder(loaded).eval(), (image,), strict=True).module()(image)
        onnx_graph = VisionGraph(loaded).eval()(image)
    assert torch.allclose(exported, want, atol=1e-4) and torch.allclose(onnx_graph, want, atol=1e-4)
    with pytest.raises(ConfigError, match="output_norm_gain"):
        make_tiny_config(connector={"output_norm": True, "output_norm_gain": 0.0})


@pytest.mark.parametrize("tied", [True, False])
def test_checkpoint_round_trip(tmp_path, tiny_tokenizer, tied):
    cfg = make_tiny_config(llm={"tie_word_embeddings": tied})
    model = make_tiny_model(cfg, seed=3)
    path = save_checkpoint(model, tiny_tokenizer, tmp_path / "ckpt", extra={"step": 5})
    assert {"config.json", WEIGHTS_NAME, "tokenizer.json", "training_state.json"} <= set(tree(path))
    loaded, tok = load_checkpoint(path)
    assert loaded.config == cfg
    assert not loaded.training
    ids, labels = chat_sample(cfg, tiny_tokenizer)
    pix = pixels(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(ids, pix).logits, model(ids, pix).logits)
    state, want = loaded.state_dict(), model.state_dict()
    assert all(torch.equal(state[k], want[k]) for k in want)
    if tied:
        assert loaded.llm.lm_head.weight.data_ptr() == loaded.llm.get_input_embeddings().weight.data_ptr()
    # tokenizer round trip
    text = "USER: What colour is the large red circle? ASSISTANT: red"
    assert tok.encode(text) == tiny_tokenizer.encode(text)
    assert tok.get_vocab() == tiny_tokenizer.get_vocab()
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id)
    assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_save_is_atomic(tmp_path, tiny_model, tiny_tokenizer):
    target = tmp_path / "ckpt"
    save_checkpoint(tiny_model, tiny_tokenizer, target)
    save_checkpoint(tiny_model, tiny_tokenizer, target)  # overwrite in place
    assert tree(tmp_path) == ["ckpt"]  # no .tmp-/.old- leftovers
    before = {p.name: p.read_bytes() for p in target.iterdir()}

    class Broken:  # a tokenizer whose save fails half-way through the checkpoint
        def save_pretrained(self, path):
            (path / "tokenizer.json").write_text("{")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tiny_model, Broken(), target)
    assert tree(tmp_path) == ["ckpt"]
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before  # the old checkpoint is intact


def copy_checkpoint(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_truncated_weights_name_the_file(tmp_path, tiny_checkpoint):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    weights = path / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert WEIGHTS_NAME in str(e.value) and "truncated or corrupt" in str(e.value)


@pytest.mark.parametrize("key", ["llm.model.layers.1.mlp.up_proj.weight", "llm.model.embed_tokens.weight",
                                 "connector.peg.peg.0.bias"])
def test_missing_tensor_is_named(tmp_path, tiny_checkpoint, key):
    from safetensors.torch import load_file, save_file

    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    state = load_file(str(path / WEIGHTS_NAME))
    del state[key]
    save_file(state, str(path / WEIGHTS_NAME))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "missing" in str(e.value) and key in str(e.value)


def test_mismatched_and_unexpected_tensors_are_named(tmp_path, tiny_checkpoint):
    from safetensors.torch import load_file, save_file

    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    state = load_file(str(path / WEIGHTS_NAME))
    state["llm.model.norm.weight"] = torch.ones(65)
    state["connector.extra.weight"] = torch.ones(3)
    save_file(state, str(path / WEIGHTS_NAME))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "llm.model.norm.weight (65,) vs model (64,)" in msg
    assert "unexpected" in msg and "connector.extra.weight" in msg


def test_missing_config_or_folder_is_a_clear_error(tmp_path, tiny_checkpoint):
    path = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    os.remove(path / "config.json")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "missing config.json" in str(e.value) and WEIGHTS_NAME in str(e.value)  # says what is there
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_a_training_run_folder_loads_the_model_its_index_names(tmp_path, tiny_checkpoint, capsys):
    """A run folder says which checkpoint it stands for (run.json, written by training after each stage):
    the latest policy whose folder is complete; models/ knows no stage names."""
    run = tmp_path / "run"
    for stage in ("pretrain", "instruct"):
        copy_checkpoint(tiny_checkpoint, run / stage)
        record_run_stage(run, stage, policy=True)
    (run / "dpo").mkdir()  # recorded, then its folder lost its files: skipped
    record_run_stage(run, "dpo", policy=True)
    model, _ = load_checkpoint(run)
    err = capsys.readouterr().err
    assert "using its latest model" in err and str(run / "instruct") in err and model.config.name == "tiny"
    assert check_checkpoint_dir(run) == run / "instruct"
    with pytest.raises(CheckpointError, match="missing config.json"):
        check_checkpoint_dir(run / "dpo")


def test_a_run_with_rm_and_ppo_stands_for_ppos_policy_not_the_reward_model(tmp_path, tiny_checkpoint):
    run = tmp_path / "run"
    for stage, policy in (("instruct", True), ("dpo", True), ("rm", False), ("ppo", True)):
        copy_checkpoint(tiny_checkpoint, run / stage)
        record_run_stage(run, stage, policy=policy)
    assert check_checkpoint_dir(run) == run / "ppo"
    record_run_stage(run, "rm", policy=False)  # a reward model finished last is still not the run's model
    assert check_checkpoint_dir(run) == run / "ppo"
    record_run_stage(run, "dpo", policy=True)  # retrained last: the latest policy
    assert check_checkpoint_dir(run) == run / "dpo"


def test_a_run_folder_without_a_finished_model_is_a_clear_error(tmp_path, tiny_checkpoint):
    run = tmp_path / "run"
    copy_checkpoint(tiny_checkpoint, run / "rm")
    record_run_stage(run, "rm", policy=False)
    with pytest.raises(CheckpointError, match="no finished model"):
        check_checkpoint_dir(run)
    (run / "run.json").unlink()  # no index (or not a run folder): say which sub-folders are checkpoints
    with pytest.raises(CheckpointError, match=r"missing config.json.*sub-folders rm are checkpoints"):
        check_checkpoint_dir(run)


# ------------------------------------------------------------------------------------- inference


def test_token_stream_holds_back_incomplete_utf8(tiny_tokenizer):
    from mobilemllm.inference import TokenStream

    text = "a red ✓ circle — é"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split())  # the symbols are split into byte tokens
    pieces: list[str] = []
    stream = TokenStream(tiny_tokenizer, pieces.append, skip=[tiny_tokenizer.eos_token_id])
    for t in ids + [tiny_tokenizer.eos_token_id]:
        stream.put(t)
    assert stream.finish(tiny_tokenizer.decode(ids)) == text == "".join(pieces)
    assert not any("\ufffd" in p for p in pieces)


def test_text_stream_returns_the_final_decode_when_the_decoder_rewrites_earlier_bytes():
    """A byte-fallback decoder turns "\\x1b" into U+FFFD once an invalid continuation byte follows: the
    control character is held back, and the answer is the final decode, not the text shown first."""
    from mobilemllm.inference import TextStream

    pieces: list[str] = []
    s = TextStream(pieces.append)
    for decoded in ["\x1b", "\ufffd\ufffd", "\ufffd\ufffd a"]:
        s.update(decoded)
    assert s.finish("\ufffd\ufffd a") == "\ufffd\ufffd a" == "".join(pieces)
    shown_first = TextStream(pieces.append)
    shown_first.update("x")
    assert shown_first.finish("y") == "y"  # a rewrite of text already shown: the final decode wins


def test_answer_streams_the_same_text_it_returns(tiny_model, tiny_tokenizer, shapes_image):
    pieces: list[str] = []
    out = answer(tiny_model, tiny_tokenizer, shapes_image, QUESTIONS[0], max_new_tokens=10, on_text=pieces.append)
    assert "".join(pieces).strip() == out.text
    eos = tiny_tokenizer.eos_token_id
    assert out.text == tiny_tokenizer.decode([t for t in out.tokens if t != eos], skip_special_tokens=True).strip()
