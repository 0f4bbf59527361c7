"""Export: a checkpoint -> a bundle folder (model file(s) + tokenizer + manifest.json).

One module per format (``executorch``, ``onnx``, ``coreml``), each with ``export_<format>(model, tokenizer,
recipe, out_dir, ...)``; ``bundle`` writes and validates bundles; ``parity`` holds the shared metrics;
``recipes`` loads the per-target recipes from the top-level ``export/`` folder. Heavy backends are
imported inside the functions that use them, so importing this package is cheap.
"""
