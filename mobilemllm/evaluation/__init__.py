"""Evaluation on LLaVA-format data: VQA exact match, POPE (accuracy, precision, recall, F1, yes-ratio)
on the random / popular / adversarial splits, and the hallucinated-object rate of detailed captions.

    from mobilemllm.evaluation import evaluate, evaluate_bundle
    report = evaluate(model, tokenizer, "runs/tiny/data/eval")
    report = evaluate_bundle("bundles/tiny-android", "runs/tiny/data/eval")   # through the bundle's runner
"""

from mobilemllm.evaluation.run import evaluate, evaluate_bundle, format_table  # noqa: F401
