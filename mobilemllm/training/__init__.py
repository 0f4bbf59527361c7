"""Training: the stages of the MLLM recipe (foundations, pretrain, instruct, dpo), one trainer loop for a
CPU, one GPU or many GPUs (``torchrun``), recipes shipped as YAML, and the tiny end-to-end pipeline.

    from mobilemllm.training.pipeline import run_tiny_pipeline
    results = run_tiny_pipeline("runs/tiny")      # data + foundations + 3 stages + evaluation
"""
