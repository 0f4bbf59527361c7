"""Import published checkpoints into our checkpoint folder, offline.

    import_checkpoint("MobileVLM_V2-1.7B", "ckpt/mobilevlm-v2")                 # weights include CLIP
    import_checkpoint("MobileVLM-1.7B", "ckpt/mobilevlm-v1", vision_tower="clip-vit-large-patch14-336")
    import_checkpoint("llava-1.5-7b-hf", "ckpt/llava")
    import_checkpoint("MobileLLaMA-1.4B-Chat", "ckpt/mllama", vision_tower="clip", llm_only=True)

Source layouts (``SOURCE_LAYOUTS``, auto-detected from ``config.json``):

- ``mobilevlm``: MobileVLM v1/v2 (``MobileLlamaForCausalLM``: a LLaMA config plus ``mm_*`` keys). Keys
  ``model.{embed_tokens,layers,norm}.*``, ``lm_head.weight``, ``model.mm_projector.*`` and, when the
  file has them, ``model.vision_tower.vision_tower.vision_model.*``. Projectors ``ldpnet`` -> ``ldp``,
  ``ldpnetv2`` -> ``ldpv2``, ``mlp2x_gelu`` -> ``mlp2x_gelu`` (our modules use the same submodule names, so
  the mapping is a prefix rename).
- ``llava-hf``: ``LlavaForConditionalGeneration`` folders, in any of the key layouts transformers has
  written (hub files ``vision_tower.vision_model.*``/``language_model.model.*``, transformers 5
  ``vision_tower.*``, in-memory ``model.vision_tower.*``/``model.language_model.*``/``lm_head.*``).
- ``llama``: a plain LLaMA causal LM (MobileLLaMA); only with ``llm_only=True``.

``llm_only=True`` takes just the language model from the source; the connector starts from seeded random
weights (``connector`` kind) and the vision tower comes from ``vision_tower`` or the source's own copy.

Every source tensor must land on exactly one of our tensors with the same shape, and every one of ours
must be filled; anything else is a :class:`CheckpointError` that names the tensors. Architecture details
our modules cannot reproduce (activation, biases, RoPE scaling, a projector's fixed pooling size) are
refused rather than imported approximately.

Modules: ``files`` (reading folders), ``keys`` (renaming tensors), ``configs`` (LLM config), ``towers`` (vision
tower configs), ``mobilevlm`` / ``llava_hf`` / ``llama`` (one plan per format), ``tokenizer``, ``run`` (the import).
"""

from mobilemllm.models.importers.files import detect_format, read_json, read_weights, weight_files
from mobilemllm.models.importers.keys import map_keys
from mobilemllm.models.importers.plan import SOURCE_LAYOUTS, IMPORT_INFO_NAME, PROJECTORS, TEMPLATE
from mobilemllm.models.importers.run import ImportResult, import_checkpoint, import_checkpoint_with_report
from mobilemllm.models.importers.tokenizer import load_source_tokenizer

__all__ = ["SOURCE_LAYOUTS", "IMPORT_INFO_NAME", "PROJECTORS", "TEMPLATE", "ImportResult", "detect_format",
           "import_checkpoint", "import_checkpoint_with_report", "load_source_tokenizer", "map_keys", "read_json",
           "read_weights", "weight_files"]
