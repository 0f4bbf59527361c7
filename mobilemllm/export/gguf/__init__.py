"""GGUF export: the text model as a LLaMA GGUF and the vision tower + connector as an mmproj GGUF, the two
files llama.cpp (``llama-mtmd-cli``, ``llama-server --mmproj``, llama-cpp-python) loads for a LLaVA-style
model.

- :mod:`.support`: what llama.cpp's clip.cpp can run (projectors ``mlp``, ``ldp``, ``ldpv2``), checked
  before any file is written.
- :mod:`.text`: the LLaMA GGUF (hyperparameters, tensors, tokenizer metadata from :mod:`.vocab`).
- :mod:`.mmproj`: the mmproj GGUF (tower, projector, image geometry and normalisation).
- :mod:`.quantize`: q8_0 / q4_0 / q4_k_m through llama.cpp's own quantizer.
- whether the installed llama.cpp runs CLIP towers (class token) right is asked by
  :mod:`mobilemllm.runtime.llamacpp_probe` (the GGUF runner warns with it too).
- :mod:`.format`: the export pipeline's plug-in (``format: gguf`` recipes, export/gguf.yaml).
"""
