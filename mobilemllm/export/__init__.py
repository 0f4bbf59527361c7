"""Export: a checkpoint -> a bundle folder (model file(s) + tokenizer + manifest.json).

One pipeline (``pipeline.export_bundle``: preflight -> modules -> quantize -> lower/convert -> parity ->
manifest -> finish) runs every format; each format is a plug-in (``plugin.ExportFormat``) registered in
``formats.FORMATS``: ``executorch`` (backends in ``executorch_backends``: xnnpack, portable, coreml, qnn),
``onnx`` (``onnx_graphs``, ``onnx_quantize``, ``onnx_genai``, ``onnx_parity``) and ``coreml``. The
export-ready modules they share are in ``modules``; the quantization schemes in the registry
``mobilemllm.quantization``; ``parity`` holds the shared metrics and references; ``recipes`` loads the
per-target recipes from the top-level ``export/`` folder. Heavy backends are imported inside the functions
that use them, so importing this package is cheap.
"""
