"""The export format registry: a recipe's ``format`` -> the plug-in the pipeline runs.

A new format (GGUF, say) is one module with an :class:`mobilemllm.export.plugin.ExportFormat` subclass,
added here; its schemes go into the quantization registry (:mod:`mobilemllm.quantization`), and a runner
for its bundles into ``mobilemllm/runtime/``.
"""

from __future__ import annotations

from mobilemllm.bundle.layout import FORMATS as BUNDLE_FORMATS
from mobilemllm.export.coreml import CoreMLFormat
from mobilemllm.export.executorch import ExecuTorchFormat
from mobilemllm.export.gguf.format import GgufFormat
from mobilemllm.export.onnx import OnnxFormat
from mobilemllm.export.plugin import ExportFormat

FORMATS: dict[str, ExportFormat] = {f.name: f for f in (ExecuTorchFormat(), OnnxFormat(), CoreMLFormat(),
                                                        GgufFormat())}
# The bundle contract names the formats a manifest may carry; a plug-in with another name would write bundles
# no runner accepts, so the two lists must agree (checked at import, like the connector registry).
if tuple(FORMATS) != BUNDLE_FORMATS:
    raise RuntimeError(f"export plug-ins {tuple(FORMATS)} differ from the bundle formats {BUNDLE_FORMATS}")
