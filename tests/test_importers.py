"""Checkpoint importers (mobilemllm.models.importers): tiny MobileVLM v1/v2, LLaVA-HF and LLaMA folders written
in the published key layouts, imported, and checked tensor by tensor and against reference forward passes.

The MobileVLM projector references below are plain-torch rebuilds of the published modules (torchvision's
MobileNetV3 ``InvertedResidual`` with timm's ``LayerNormAct2d`` for v1, the v2 ``LDPNetV2Projector`` with its
fixed ``AdaptiveAvgPool2d((12, 12))``), written from their key layouts: they share no code with ours.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from mobilemllm.errors import CheckpointError, ConfigError, UserError
from mobilemllm.models.checkpoint import WEIGHTS_NAME, load_checkpoint
from mobilemllm.models.importers import IMPORT_INFO_NAME, import_checkpoint
from mobilemllm.bundle.layout import IMAGE_TOKEN_ID

VOCAB = 400
QUESTION = "What colour is the circle?"
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# ---------------------------------------------------------------------------- reference modules


class RefLayerNormAct2d(nn.LayerNorm):  # timm LayerNormAct2d(act_layer=None): channel LayerNorm on NCHW
    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


def ref_conv_norm_act(cin, cout, k, stride, groups, act):  # torchvision ConvNormActivation: conv, norm[, act]
    layers = [nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False), RefLayerNormAct2d(cout)]
    if act:
        layers.append(nn.Hardswish())
    return nn.Sequential(*layers)


class RefSE(nn.Module):  # torchvision SqueezeExcitation with scale_activation=Hardsigmoid
    def __init__(self, c, squeeze):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)

    def forward(self, x):
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(self.avgpool(x)))))


class RefInvertedResidual(nn.Module):  # MobileNetV3 block, expansion 1 (no expand conv), SE, HS
    def __init__(self, c, stride):
        super().__init__()
        squeeze = max(8, int(c // 4 + 4) // 8 * 8)  # torchvision _make_divisible(c // 4, 8)
        if squeeze < 0.9 * (c // 4):
            squeeze += 8
        self.use_res_connect = stride == 1
        self.block = nn.Sequential(ref_conv_norm_act(c, c, 3, stride, c, True), RefSE(c, squeeze),
                                   ref_conv_norm_act(c, c, 1, 1, 1, False))

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res_connect else y


class RefLDPBlock(nn.Module):
    def __init__(self, inc, ouc):
        super().__init__()
        self.mlp = nn.Sequential(nn.Identity(), nn.Linear(inc, ouc), nn.GELU(), nn.Linear(ouc, ouc))
        self.mb_block = nn.Sequential(nn.Identity(), RefInvertedResidual(ouc, 1), RefInvertedResidual(ouc, 2))

    def forward(self, x):
        b, n, _ = x.shape
        h = int(math.sqrt(n))
        x = self.mlp(x).permute(0, 2, 1).reshape(b, -1, h, h)
        return self.mb_block(x).flatten(2).permute(0, 2, 1)


class RefLDPNetProjector(nn.Module):  # MobileVLM v1 "ldpnet": keys model.mlp.*, model.mb_block.*
    def __init__(self, inc, ouc):
        super().__init__()
        self.model = RefLDPBlock(inc, ouc)

    def forward(self, x):
        return self.model(x)


class RefFeatureIR(nn.Module):
    def __init__(self, inc, ouc):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(inc, ouc), nn.GELU(), nn.Linear(ouc, ouc))

    def forward(self, x):
        return self.mlp(x)


class RefPEG(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.peg = nn.Sequential(nn.Conv2d(c, c, 3, 1, 1, bias=True, groups=c))

    def forward(self, x):  # tokens in, tokens out
        b, n, c = x.shape
        h = int(math.sqrt(n))
        f = x.transpose(1, 2).reshape(b, c, h, h)
        return (self.peg(f) + f).flatten(2).transpose(1, 2)


class RefLDPNetV2Projector(nn.Module):  # MobileVLM v2 "ldpnetv2": keys mlp.mlp.*, peg.peg.*
    def __init__(self, inc, ouc):
        super().__init__()
        self.mlp = RefFeatureIR(inc, ouc)
        self.dwn = nn.AdaptiveAvgPool2d((12, 12))  # fixed output grid, as published
        self.peg = RefPEG(ouc)

    def forward(self, x):
        x = self.mlp(x)
        b, n, c = x.shape
        h = int(math.sqrt(n))
        x = self.dwn(x.transpose(1, 2).reshape(b, c, h, h)).flatten(2).transpose(1, 2)
        return self.peg(x)


# ---------------------------------------------------------------------------- folder builders


def llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2)
    base.update(kw)
    return LlamaConfig(**base)


def clip_vision_config(hidden=64, heads=2, image=32, patch=4, layers=2):
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                            num_attention_heads=heads, image_size=image, patch_size=patch, hidden_act="quick_gelu")


def round_to(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Round a float32 module's weights through ``dtype`` so references match weights stored in ``dtype``."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(dtype).float())
    return module.eval()


def write_spm_tokenizer(folder: Path) -> bytes:
    """A LLaMA-style sentencepiece tokenizer.model (+ tokenizer_config.json), as MobileVLM folders ship."""
    import sentencepiece as spm

    from mobilemllm.data.shapes import corpus_lines
    from mobilemllm.templates import TEMPLATES

    lines = list(corpus_lines(num_images=60, seed=0))
    for t in TEMPLATES.values():
        lines += [t.prompt_prefix(), t.prompt_suffix(QUESTION)]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=VOCAB, model_type="bpe", character_coverage=1.0,
        byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
        allow_whitespace_only_pieces=True)
    (folder / "tokenizer.model").write_bytes(buf.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False, "model_max_length": 2048, "pad_token": None}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    return buf.getvalue()


def mobilevlm_config_json(projector: str, mm_hidden: int, tower: str, **extra) -> dict:
    cfg = llama_config().to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id",
            "hidden_act", "initializer_range", "max_position_embeddings")
    data = {k: cfg[k] for k in keep}
    data.update({
        "_name_or_path": "mtgv/MobileVLM", "architectures": ["MobileLlamaForCausalLM"], "model_type": "mobilevlm",
        "max_sequence_length": 512, "pad_token_id": 0, "pretraining_tp": 1, "rope_scaling": None,
        "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": True, "freeze_mm_mlp_adapter": False,
        "image_aspect_ratio": "pad", "mm_hidden_size": mm_hidden, "mm_projector_type": projector,
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2, "mm_vision_tower": tower, "tune_mm_mlp_adapter": False, "use_mm_proj": True,
        "vision_tower_type": "clip"})
    data.update(extra)
    return data


class MobileVLMSource:
    """A tiny MobileVLM folder plus the reference modules whose weights it holds."""

    def __init__(self, folder, llama, projector, clip, config, spm_model):
        self.folder, self.llama, self.projector, self.clip = folder, llama, projector, clip
        self.config, self.spm_model = config, spm_model


def write_mobilevlm(folder: Path, projector: str, clip_cfg, with_tower: bool, shards: str,
                    dtype: torch.dtype = torch.float32, seed: int = 0, tower_dir: Path | None = None,
                    tower: str = "openai/clip-vit-large-patch14-336") -> MobileVLMSource:
    """Write config.json, weights in MobileVLM's key layout and a sentencepiece tokenizer into ``folder``.

    With ``tower_dir`` the tower is also saved there (``CLIPVisionModel.save_pretrained`` + a preprocessor config)
    and ``mm_vision_tower`` names that path, as on the machine a MobileVLM was trained on.
    """
    from transformers import CLIPVisionModel, LlamaForCausalLM

    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    llama = round_to(LlamaForCausalLM(llama_config()), dtype)
    proj_cls = {"ldpnet": RefLDPNetProjector, "ldpnetv2": RefLDPNetV2Projector,
                "mlp2x_gelu": lambda i, o: nn.Sequential(nn.Linear(i, o), nn.GELU(), nn.Linear(o, o))}[projector]
    proj = round_to(proj_cls(clip_cfg.hidden_size, 64), dtype)
    with torch.no_grad():  # non-trivial norms so a swapped weight/bias would show
        for m in proj.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    round_to(proj, dtype)
    clip = round_to(CLIPVisionModel(clip_cfg), dtype)
    state = {k: v for k, v in llama.state_dict().items()}  # model.embed_tokens, model.layers, model.norm, lm_head
    state.update({"model.mm_projector." + k: v for k, v in proj.state_dict().items()})
    if with_tower:
        state.update({"model.vision_tower.vision_tower.vision_model." + k: v for k, v in clip.state_dict().items()})
    state = {k: v.to(dtype).contiguous() for k, v in state.items()}
    keys = sorted(state)
    if shards == "bin":  # two pytorch_model-0000x-of-00002.bin shards + index, as older uploads
        halves = [keys[: len(keys) // 2], keys[len(keys) // 2:]]
        weight_map = {}
        for i, part in enumerate(halves, 1):
            name = f"pytorch_model-{i:05d}-of-00002.bin"
            torch.save({k: state[k] for k in part}, folder / name)
            weight_map.update({k: name for k in part})
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if tower_dir is not None:
        clip.save_pretrained(tower_dir)
        (tower_dir / "preprocessor_config.json").write_text(json.dumps(
            {"image_processor_type": "CLIPImageProcessor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD}))
        tower = str(tower_dir)
    config = mobilevlm_config_json(projector, clip_cfg.hidden_size, tower)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    spm_model = write_spm_tokenizer(folder)
    return MobileVLMSource(folder, llama, proj, clip, config, spm_model)


def write_clip_folder(folder: Path, clip_cfg, seed: int = 1):
    """A whole CLIPModel folder (vision + text halves) as openai/clip-vit-* ships, with its preprocessor config."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    cfg = CLIPConfig(vision_config=clip_cfg.to_dict(), projection_dim=16,
                     text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                      vocab_size=100, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    model = CLIPModel(cfg).eval()
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD,
         "crop_size": {"height": clip_cfg.image_size, "width": clip_cfg.image_size}}))
    return model


# ---------------------------------------------------------------------------- shared sources


@pytest.fixture(scope="module")
def v1_source(tmp_path_factory):
    """MobileVLM v1: ldpnet, no tower weights in the file (needs --vision-tower), two .bin shards, fp32."""
    root = tmp_path_factory.mktemp("mobilevlm_v1")
    clip_cfg = clip_vision_config()
    src = write_mobilevlm(root / "MobileVLM-1.7B", "ldpnet", clip_cfg, with_tower=False, shards="bin")
    clip_full = write_clip_folder(root / "clip-vit-large-patch14-336", clip_cfg)
    return src, root / "clip-vit-large-patch14-336", clip_full


@pytest.fixture(scope="module")
def v2_source(tmp_path_factory):
    """MobileVLM v2: ldpnetv2, CLIP weights embedded, one bf16 safetensors; 48 px / 2 = a 24x24 grid, as CLIP-L/336.
    ``mm_vision_tower`` names a local tower folder (a 128-wide tower's head count is not in its weights)."""
    root = tmp_path_factory.mktemp("mobilevlm_v2")
    clip_cfg = clip_vision_config(hidden=128, heads=2, image=48, patch=2)
    return write_mobilevlm(root / "MobileVLM_V2-1.7B", "ldpnetv2", clip_cfg, with_tower=True, shards="safetensors",
                           dtype=torch.bfloat16, tower_dir=root / "clip-vit-large-patch14-336")


def pixels(image_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


def reference_logits(ids: list[int], image_embeds: torch.Tensor, hf_llm) -> torch.Tensor:
    """Splice image embeddings into the IMAGE_TOKEN_ID run and run transformers' LLaMA (MobileVLM's way)."""
    ids_t = torch.tensor(ids)
    pos = (ids_t == IMAGE_TOKEN_ID).nonzero().flatten()
    start, n = int(pos[0]), len(pos)
    emb = hf_llm.get_input_embeddings()
    parts = [emb(ids_t[:start]), image_embeds[0], emb(ids_t[start + n:])]
    return hf_llm(inputs_embeds=torch.cat(parts).unsqueeze(0)).logits


def expected_mobilevlm_key(key: str) -> str | None:
    """Where a MobileVLM tensor must land (written independently of the importer's rule table)."""
    if key.startswith("model.mm_projector.model."):
        return "connector." + key[len("model.mm_projector.model."):]
    if key.startswith("model.mm_projector."):
        return "connector." + key[len("model.mm_projector."):]
    if key.startswith("model.vision_tower.vision_tower.vision_model."):
        return "vision.model." + key[len("model.vision_tower.vision_tower.vision_model."):]
    if key.startswith("model."):
        return "llm." + key
    if key == "lm_head.weight":
        return "llm.lm_head.weight"
    return None


# ---------------------------------------------------------------------------- MobileVLM v1


@pytest.fixture(scope="module")
def v1_imported(v1_source, tmp_path_factory):
    src, tower, _ = v1_source
    out = tmp_path_factory.mktemp("out_v1") / "mobilevlm-v1"
    assert import_checkpoint(src.folder, out, vision_tower=tower) == out
    return out


def test_v1_every_tensor_lands(v1_source, v1_imported):
    src, tower, clip_full = v1_source
    ours = load_file(str(v1_imported / WEIGHTS_NAME))
    expected = {}
    for key, value in {**src.llama.state_dict(),
                       **{"model.mm_projector." + k: v for k, v in src.projector.state_dict().items()}}.items():
        expected[expected_mobilevlm_key(key)] = value
    for key, value in clip_full.vision_model.state_dict().items():  # the --vision-tower folder's vision half
        expected["vision.model." + key] = value
    assert set(ours) == set(expected)
    for key, value in expected.items():
        assert torch.equal(ours[key].float(), value.float()), key
    cfg = json.loads((v1_imported / "config.json").read_text())
    assert cfg["connector"]["kind"] == "ldp" and cfg["template"] == "vicuna_v1"
    assert cfg["vision"]["select_layer"] == -2 and cfg["vision"]["image_aspect"] == "pad"
    assert cfg["vision"]["image_mean"] == CLIP_MEAN and cfg["llm"]["max_position_embeddings"] == 512
    info = json.loads((v1_imported / IMPORT_INFO_NAME).read_text())
    assert info["format"] == "mobilevlm" and info["tensors"] == len(expected)


def test_v1_projector_and_logits_match_reference(v1_source, v1_imported):
    from transformers import LlamaForCausalLM

    from mobilemllm.inference import prompt_ids

    src, tower, clip_full = v1_source
    model, tok = load_checkpoint(v1_imported)
    feats = torch.randn(2, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = src.projector(feats)
        got = model.connector(feats)
    assert got.shape == ref.shape == (2, 16, 64)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)

    # the language model alone vs transformers reading the same MobileVLM folder (unknown keys ignored)
    hf_llm = LlamaForCausalLM.from_pretrained(src.folder, local_files_only=True, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 77, 300, 12, 9]])
    with torch.no_grad():
        torch.testing.assert_close(model.llm(input_ids=ids).logits, hf_llm(input_ids=ids).logits, atol=1e-4, rtol=1e-4)

    # the whole pipeline: CLIP (penultimate layer, CLS dropped) -> ldpnet -> spliced into the prompt
    ids = prompt_ids(model.config, tok, QUESTION)
    pix = pixels(32)
    with torch.no_grad():
        hidden = clip_full.vision_model(pixel_values=pix, output_hidden_states=True).hidden_states[-2][:, 1:]
        ref_logits = reference_logits(ids, src.projector(hidden), hf_llm)
        got_logits = model(torch.tensor([ids]), pix).logits
    torch.testing.assert_close(got_logits, ref_logits, atol=1e-4, rtol=1e-4)


def test_v1_tokenizer_converted_from_sentencepiece(v1_source, v1_imported):
    import sentencepiece as spm

    from mobilemllm.templates import get_template

    src, _, _ = v1_source
    assert (v1_imported / "tokenizer.json").exists()
    _, tok = load_checkpoint(v1_imported)
    sp = spm.SentencePieceProcessor(model_proto=src.spm_model)
    assert (tok.bos_token_id, tok.eos_token_id) == (sp.bos_id(), sp.eos_id())
    for text, _ in get_template("vicuna_v1").prompt_segments(QUESTION):
        if text != "<image>":
            assert tok.encode(text, add_special_tokens=False) == sp.encode(text), text
    text = "a red circle in the top left"
    assert tok.encode(text, add_special_tokens=False) == sp.encode(text)


# ---------------------------------------------------------------------------- MobileVLM v2


def test_v2_embedded_tower_imports_and_matches(v2_source, tmp_path):
    from transformers import LlamaForCausalLM

    from mobilemllm.inference import prompt_ids

    src = v2_source
    out = import_checkpoint(src.folder, tmp_path / "v2")
    ours = load_file(str(out / WEIGHTS_NAME))
    written = load_file(str(src.folder / "model.safetensors"))
    assert len(ours) == len(written)
    for key, value in written.items():
        target = expected_mobilevlm_key(key)
        assert ours[target].dtype == torch.bfloat16 and torch.equal(ours[target], value), key

    model, tok = load_checkpoint(out)
    v = model.config.vision
    assert (v.image_size, v.patch_size, v.hidden_size, v.num_layers, v.num_heads, v.intermediate_size) == \
        (48, 2, 128, 2, 2, 256)  # from the tower folder's config.json
    assert model.config.connector.kind == "ldpv2" and model.config.num_visual_tokens == 144
    feats = torch.randn(1, 576, 128, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model.connector(feats), src.projector(feats), atol=1e-5, rtol=1e-5)
        hidden = src.clip(pixel_values=pixels(48), output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(model.vision(pixels(48)), hidden, atol=1e-5, rtol=1e-5)
    hf_llm = LlamaForCausalLM.from_pretrained(src.folder, local_files_only=True, dtype=torch.float32).eval()
    ids = prompt_ids(model.config, tok, QUESTION)
    with torch.no_grad():
        hidden = src.clip(pixel_values=pixels(48), output_hidden_states=True).hidden_states[-2][:, 1:]
        ref = reference_logits(ids, src.projector(hidden), hf_llm)
        got = model(torch.tensor([ids]), pixels(48)).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_mobilevlm_mlp2x_gelu_projector(tmp_path):
    from transformers import LlamaForCausalLM

    from mobilemllm.inference import prompt_ids

    src = write_mobilevlm(tmp_path / "MobileVLM-mlp", "mlp2x_gelu", clip_vision_config(hidden=64, heads=1),
                          with_tower=True, shards="safetensors", tower_dir=tmp_path / "clip-vit-base-patch16")
    model, tok = load_checkpoint(import_checkpoint(src.folder, tmp_path / "ours"))
    assert model.config.connector.kind == "mlp2x_gelu" and model.config.vision.num_heads == 1
    hf_llm = LlamaForCausalLM.from_pretrained(src.folder, local_files_only=True, dtype=torch.float32).eval()
    ids = prompt_ids(model.config, tok, QUESTION)
    with torch.no_grad():
        hidden = src.clip(pixel_values=pixels(32), output_hidden_states=True).hidden_states[-2][:, 1:]
        ref = reference_logits(ids, src.projector(hidden), hf_llm)
        got = model(torch.tensor([ids]), pixels(32)).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_v2_llm_only_keeps_language_model_and_tower(v2_source, tmp_path):
    out = import_checkpoint(v2_source.folder, tmp_path / "llm_only", llm_only=True)
    ours = load_file(str(out / WEIGHTS_NAME))
    for key, value in v2_source.llama.state_dict().items():
        assert torch.equal(ours[expected_mobilevlm_key(key)].float(), value), key
    proj = v2_source.projector.state_dict()
    assert not torch.equal(ours["connector.mlp.mlp.0.weight"].float(), proj["mlp.mlp.0.weight"])  # fresh connector
    info = json.loads((out / IMPORT_INFO_NAME).read_text())
    assert info["llm_only"] and any("seed 0" in n for n in info["notes"])


# ---------------------------------------------------------------------------- the embedded tower's config


def test_embedded_tower_config_comes_from_the_local_tower_folder(tmp_path):
    """256 wide with 2 heads of 128: a guess of 64-dim heads (4 heads) would compute other features."""
    from transformers import CLIPVisionModel

    clip_cfg = clip_vision_config(hidden=256, heads=2)
    tower = tmp_path / "clip-vit-custom"
    src = write_mobilevlm(tmp_path / "MobileVLM-custom", "mlp2x_gelu", clip_cfg, with_tower=True,
                          shards="safetensors", tower_dir=tower)
    mean = [0.5, 0.25, 0.125]
    (tower / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": CLIP_STD}))
    model, _ = load_checkpoint(import_checkpoint(src.folder, tmp_path / "ours"))
    v = model.config.vision
    assert (v.num_heads, v.hidden_size, v.num_layers, v.intermediate_size) == (2, 256, 2, 512)
    assert list(v.image_mean) == mean  # upstream's image processor comes from the tower folder too
    hf = CLIPVisionModel.from_pretrained(tower, local_files_only=True).eval()
    with torch.no_grad():
        want = hf(pixel_values=pixels(32), output_hidden_states=True).hidden_states[-2][:, 1:]
        torch.testing.assert_close(model.vision(pixels(32)), want, atol=1e-5, rtol=1e-5)

    # without the folder the head count cannot be known: refused in one line naming both ways to give it
    gone = _copy(src.folder, tmp_path / "no-folder",
                 config_edit=lambda c: c.update(mm_vision_tower=str(tmp_path / "absent" / "clip-vit-custom")))
    with pytest.raises(CheckpointError, match=r"256 wide, which matches no OpenAI CLIP .*head count") as e:
        import_checkpoint(gone, tmp_path / "no")
    assert "\n" not in str(e.value) and "--vision-tower" in str(e.value) and "absent/clip-vit-custom" in str(e.value)
    assert not (tmp_path / "no").exists()
    # --vision-tower gives config and weights
    model, _ = load_checkpoint(import_checkpoint(gone, tmp_path / "flag", vision_tower=tower))
    assert model.config.vision.num_heads == 2


def test_published_clip_widths_give_their_head_counts():
    from mobilemllm.models.importers.towers import vision_from_weights

    for hidden, layers, heads in ((1024, 24, 16), (768, 12, 12)):
        with torch.device("meta"):  # shapes only
            state = {"vision.model.embeddings.patch_embedding.weight": torch.empty(hidden, 3, 14, 14),
                     "vision.model.embeddings.position_embedding.weight": torch.empty(577, hidden),
                     **{f"vision.model.encoder.layers.{i}.mlp.fc1.weight": torch.empty(4 * hidden, hidden)
                        for i in range(layers)}}
        v = vision_from_weights(state, "ckpt", "openai/clip-vit-large-patch14-336")
        assert (v.num_heads, v.num_layers, v.image_size, v.patch_size, v.intermediate_size) == \
            (heads, layers, 336, 14, 4 * hidden)


# ---------------------------------------------------------------------------- LLaVA-HF


@pytest.fixture(scope="module")
def llava_tokenizer():
    from mobilemllm.data.tokenizer import tiny_tokenizer

    tok = tiny_tokenizer(vocab_size=300, num_images=60)
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return tok


def write_llava(folder: Path, tok, vision_cfg=None, strategy: str = "default", bias: bool = True, seed: int = 3):
    """A tiny LlavaForConditionalGeneration saved by transformers, with a tokenizer.json holding <image>."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    image_token = tok.convert_tokens_to_ids("<image>")
    vision_cfg = vision_cfg or clip_vision_config()
    cfg = LlavaConfig(vision_config=vision_cfg, text_config=llama_config(), image_token_index=image_token,
                      projector_hidden_act="gelu", vision_feature_layer=-2, vision_feature_select_strategy=strategy,
                      image_seq_length=vision_cfg.image_size ** 2 // vision_cfg.patch_size ** 2,
                      multimodal_projector_bias=bias)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg).eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "image_mean": CLIP_MEAN, "image_std": CLIP_STD}))
    return folder, model, image_token


@pytest.fixture(scope="module")
def llava_source(tmp_path_factory, llava_tokenizer):
    return write_llava(tmp_path_factory.mktemp("llava") / "llava-1.5-tiny-hf", llava_tokenizer)


def relayout(src: Path, dst: Path, rename) -> Path:
    """Copy a LLaVA-HF folder, renaming the weights' keys (another transformers version's layout)."""
    import shutil

    shutil.copytree(src, dst)
    state = load_file(str(src / "model.safetensors"))
    save_file({rename(k): v for k, v in state.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def _hub_layout(k: str) -> str:  # llava-hf/llava-1.5-7b-hf as uploaded with transformers 4.x
    return "vision_tower.vision_model." + k[len("vision_tower."):] if k.startswith("vision_tower.") else k


def _memory_layout(k: str) -> str:  # transformers >= 4.52 module names
    for old, new in (("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
                     ("vision_tower.", "model.vision_tower."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):
        if k.startswith(old):
            return new + k[len(old):]
    return k


@pytest.mark.parametrize("layout", ["transformers5", "hub", "memory"])
def test_llava_hf_imports_and_matches_transformers(llava_source, tmp_path, layout):
    from mobilemllm.inference import prompt_ids

    folder, hf_model, image_token = llava_source
    if layout == "hub":
        folder = relayout(folder, tmp_path / "hub", _hub_layout)
    elif layout == "memory":
        folder = relayout(folder, tmp_path / "memory", _memory_layout)
    out = import_checkpoint(folder, tmp_path / "ours")
    ours = load_file(str(out / WEIGHTS_NAME))
    theirs = hf_model.state_dict()  # module names: model.vision_tower.*, model.multi_modal_projector.*, ...
    expected = {}
    for k, v in theirs.items():
        if k.startswith("model.vision_tower."):
            expected["vision.model." + k[len("model.vision_tower."):]] = v
        elif k.startswith("model.multi_modal_projector.linear_1."):
            expected["connector.0." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("model.multi_modal_projector.linear_2."):
            expected["connector.2." + k.rsplit(".", 1)[1]] = v
        elif k.startswith("model.language_model."):
            expected["llm.model." + k[len("model.language_model."):]] = v
        elif k == "lm_head.weight":
            expected["llm.lm_head.weight"] = v
    assert len(expected) == len(theirs) and set(ours) == set(expected)
    for k, v in expected.items():
        assert torch.equal(ours[k], v), k

    model, tok = load_checkpoint(out)
    assert model.config.connector.kind == "mlp2x_gelu" and model.config.num_visual_tokens == 64
    ids = prompt_ids(model.config, tok, QUESTION)
    hf_ids = [image_token if i == IMAGE_TOKEN_ID else i for i in ids]
    pix = pixels(32, seed=4)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor([hf_ids]), pixel_values=pix).logits
        got = model(torch.tensor([ids]), pix).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def llava_logits_match(folder: Path, hf_model, image_token: int, out: Path) -> None:
    from mobilemllm.inference import prompt_ids

    model, tok = load_checkpoint(import_checkpoint(folder, out))
    ids = prompt_ids(model.config, tok, QUESTION)
    hf_ids = [image_token if i == IMAGE_TOKEN_ID else i for i in ids]
    pix = pixels(model.config.vision.image_size, seed=6)
    with torch.no_grad():
        ref = hf_model(input_ids=torch.tensor([hf_ids]), pixel_values=pix).logits
        got = model(torch.tensor([ids]), pix).logits
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_llava_hf_sparse_nested_configs(llava_source, tmp_path):
    """Hub config.json files keep only the nested configs' non-default keys (e.g. llava-1.5-7b-hf's text_config)."""
    import shutil

    from transformers import CLIPVisionConfig, LlamaConfig

    folder, hf_model, image_token = llava_source
    sparse = tmp_path / "sparse"
    shutil.copytree(folder, sparse)
    cfg = json.loads((sparse / "config.json").read_text())
    for key, klass in (("text_config", LlamaConfig), ("vision_config", CLIPVisionConfig)):
        defaults = klass().to_dict()
        cfg[key] = {k: v for k, v in cfg[key].items() if k == "model_type" or defaults.get(k, object()) != v}
    assert "hidden_act" not in cfg["text_config"] and "hidden_act" not in cfg["vision_config"]
    (sparse / "config.json").write_text(json.dumps(cfg))
    llava_logits_match(sparse, hf_model, image_token, tmp_path / "ours")


def test_llava_hf_bias_free_projector(llava_tokenizer, tmp_path):
    folder, hf_model, image_token = write_llava(tmp_path / "nobias", llava_tokenizer, bias=False)
    llava_logits_match(folder, hf_model, image_token, tmp_path / "ours")
    assert not load_file(str(tmp_path / "ours" / WEIGHTS_NAME))["connector.0.bias"].any()


def test_llava_hf_siglip_tower(llava_tokenizer, tmp_path):
    from transformers import SiglipVisionConfig

    siglip = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                image_size=32, patch_size=4)  # with its pooling head, which LLaVA never reads
    folder, hf_model, image_token = write_llava(tmp_path / "siglip", llava_tokenizer, siglip, strategy="full")
    llava_logits_match(folder, hf_model, image_token, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / "config.json").read_text())["vision"]["kind"] == "siglip"
    bad, _, _ = write_llava(tmp_path / "siglip_default", llava_tokenizer, siglip, strategy="default")
    with pytest.raises(CheckpointError, match="vision_feature_select_strategy 'default' with a siglip tower"):
        import_checkpoint(bad, tmp_path / "no")


# ---------------------------------------------------------------------------- plain LLaMA (--llm-only)


def test_llama_llm_only_with_tower_folder(v1_source, tmp_path):
    from transformers import LlamaForCausalLM

    _, tower, clip_full = v1_source
    torch.manual_seed(5)
    llama = LlamaForCausalLM(llama_config()).eval()
    src = tmp_path / "MobileLLaMA-1.4B-Chat"
    llama.save_pretrained(src)
    write_spm_tokenizer(src)
    with pytest.raises(CheckpointError, match="--llm-only"):
        import_checkpoint(src, tmp_path / "no")
    out = import_checkpoint(src, tmp_path / "ours", vision_tower=tower, llm_only=True, connector="mlp2x_gelu")
    model, _ = load_checkpoint(out)
    assert model.config.connector.kind == "mlp2x_gelu"
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        torch.testing.assert_close(model.llm(input_ids=ids).logits, llama(input_ids=ids).logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.vision(pixels(32)), clip_full.vision_model(
            pixel_values=pixels(32), output_hidden_states=True).hidden_states[-2][:, 1:], atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------- errors


def _copy(src: Path, dst: Path, config_edit=None, state_edit=None) -> Path:
    """A copy of a source folder with its config.json and/or weights edited."""
    import shutil

    shutil.copytree(src, dst)
    if config_edit:
        cfg = json.loads((dst / "config.json").read_text())
        config_edit(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if state_edit:
        state = load_file(str(dst / "model.safetensors"))
        state_edit(state)
        save_file(state, str(dst / "model.safetensors"))
    return dst


def test_missing_vision_tower_says_how_to_fix(v1_source, tmp_path):
    src, _, _ = v1_source
    with pytest.raises(CheckpointError, match=r"no vision tower weights .*--vision-tower") as e:
        import_checkpoint(src.folder, tmp_path / "out")
    assert "openai/clip-vit-large-patch14-336" in str(e.value)
    assert not (tmp_path / "out").exists()


def test_unknown_projector_lists_supported(v2_source, tmp_path):
    bad = _copy(v2_source.folder, tmp_path / "bad", config_edit=lambda c: c.update(mm_projector_type="ldpnetv3"))
    with pytest.raises(CheckpointError, match=r"unknown mm_projector_type 'ldpnetv3'; supported: ldpnet .*ldpnetv2 "
                                              r".*mlp2x_gelu"):
        import_checkpoint(bad, tmp_path / "out")


def test_missing_config_keys_are_named_together(v2_source, tmp_path):
    def drop(c):
        for k in ("num_hidden_layers", "vocab_size", "mm_hidden_size"):
            del c[k]

    bad = _copy(v2_source.folder, tmp_path / "bad", config_edit=drop)
    with pytest.raises(CheckpointError, match=r"num_hidden_layers, vocab_size.*mm_hidden_size"):
        import_checkpoint(bad, tmp_path / "out")


def test_missing_unexpected_and_mismatched_tensors_are_named(v2_source, tmp_path):
    key = "model.layers.1.mlp.up_proj.weight"
    bad = _copy(v2_source.folder, tmp_path / "missing", state_edit=lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match=r"1 missing tensor\(s\): " + key.replace(".", r"\.")):
        import_checkpoint(bad, tmp_path / "out")
    bad = _copy(v2_source.folder, tmp_path / "extra", state_edit=lambda s: s.update({"model.extra_head.weight":
                                                                                     torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"model\.extra_head\.weight"):
        import_checkpoint(bad, tmp_path / "out")
    bad = _copy(v2_source.folder, tmp_path / "shape",
                state_edit=lambda s: s.update({"model.mm_projector.peg.peg.0.bias": torch.zeros(3)}))
    with pytest.raises(CheckpointError, match=r"wrong shape.*model\.mm_projector\.peg\.peg\.0\.bias \(3,\)"):
        import_checkpoint(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_vision_tower_width_must_match_mm_hidden_size(v1_source, v2_source, tmp_path):
    _, tower, _ = v1_source  # 64 wide; v2 was trained on a 128-wide tower
    with pytest.raises(CheckpointError, match=r"64 wide but .*mm_hidden_size 128"):
        import_checkpoint(v2_source.folder, tmp_path / "out", vision_tower=tower)


def test_v2_projector_needs_a_24x24_grid(v1_source, v2_source, tmp_path):
    from transformers import CLIPVisionModel

    tower = tmp_path / "clip128_32px"
    CLIPVisionModel(clip_vision_config(hidden=128, image=32, patch=4)).save_pretrained(tower)
    with pytest.raises(CheckpointError, match=r"fixed 12x12 grid.*8x8"):
        import_checkpoint(v2_source.folder, tmp_path / "out", vision_tower=tower)


def test_out_folder_is_protected(v2_source, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a checkpoint"):
        import_checkpoint(v2_source.folder, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="overlaps the source"):
        import_checkpoint(v2_source.folder, v2_source.folder / "out")
    with pytest.raises(ConfigError, match="valid formats"):
        import_checkpoint(v2_source.folder, tmp_path / "x", format="gguf")


def test_unknown_model_type_is_refused(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text(json.dumps({"model_type": "qwen2_vl", "architectures": ["X"]}))
    with pytest.raises(CheckpointError, match="cannot tell the format.*--format"):
        import_checkpoint(tmp_path / "src", tmp_path / "out")


# ---------------------------------------------------------------------------- CLI


def test_cli_import_and_errors(v2_source, v1_source, tmp_path, capsys):
    from mobilemllm.cli import main

    out = tmp_path / "cli"
    assert main(["import", str(v2_source.folder), "--out", str(out)]) == 0
    assert "mobilevlm" in capsys.readouterr().out
    assert (out / "config.json").exists() and (out / "tokenizer.json").exists()
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["visual_tokens"] == 144

    src, _, _ = v1_source
    assert main(["import", str(src.folder), "--out", str(tmp_path / "no")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "--vision-tower" in err and "Traceback" not in err
    assert main(["import", str(src.folder), "--out", str(tmp_path / "no"), "--format", "gguf"]) == 2
    assert "valid formats" in capsys.readouterr().err
    assert main(["import", "--help"]) == 0
