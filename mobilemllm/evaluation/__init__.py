"""Evaluation on LLaVA-format data: VQA exact match, POPE (accuracy, precision, recall, F1, yes-ratio)
on the random / popular / adversarial splits, and the hallucinated-object rate of detailed captions.

    from mobilemllm.evaluation import evaluate
    report = evaluate(model, tokenizer, "runs/tiny/data/eval")
"""

from mobilemllm.evaluation.run import evaluate, format_table  # noqa: F401
