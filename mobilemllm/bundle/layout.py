"""Names and constants of the bundle contract: file names, formats, token layout.

One home for every name that export writes and the runtime, the benchmark, the demo and the apps read.
"""

from __future__ import annotations

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"
FORMATS = ("executorch", "onnx", "coreml", "gguf")
QUESTION = "{question}"  # placeholder in the prompt's text segments

# ExecuTorch bundles: one program with the methods MultimodalRunner calls.
PROGRAM_NAME = "model.pte"
# Android: where `mobilemllm push` and `bench --device adb` put bundles; android_demo lists this folder
# (readable by apps without storage permissions).
DEVICE_ROOT = "/data/local/tmp/mobilemllm"
# ONNX bundles: one graph per part.
GRAPH_FILES = {"vision_encoder": "vision.onnx", "token_embedding": "embed.onnx", "text_decoder": "decoder.onnx"}

# Token layout (LLaVA/MobileVLM's): IMAGE_TOKEN_ID marks every visual-token position in a prompt's
# ids; IGNORE_INDEX marks label positions that carry no loss.
IMAGE_TOKEN_ID = -200
IGNORE_INDEX = -100
