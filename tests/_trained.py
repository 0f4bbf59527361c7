"""A trained tiny model for slow tests, trained once per test session and shared.

    from _trained import trained_tiny          # tests/ is on sys.path under pytest

    @pytest.fixture(scope="session")
    def trained(tmp_path_factory):
        return trained_tiny(tmp_path_factory)    # {"out_dir", "results", "checkpoints", "eval_dir"}

    def test_export_trained(trained):
        ckpt = trained["checkpoints"]["dpo"]     # also "foundations", "pretrain", "instruct"

It runs :func:`mobilemllm.training.pipeline.run_tiny_pipeline` (about 15 minutes or less on a 2-core
CPU). Set MOBILEMLLM_TRAINED_TINY=/some/folder to keep the result between sessions: finished stages
in that folder are reused, so later sessions only evaluate (seconds).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_CACHE: dict[str, Any] = {}


def trained_tiny(tmp_path_factory) -> dict[str, Any]:
    if "result" not in _CACHE:
        from mobilemllm.training.pipeline import run_tiny_pipeline

        keep = os.environ.get("MOBILEMLLM_TRAINED_TINY")
        out = Path(keep) if keep else tmp_path_factory.getbasetemp() / "trained_tiny"
        results = run_tiny_pipeline(out, progress=False)
        _CACHE["result"] = {
            "out_dir": out,
            "results": results,
            "checkpoints": {s: Path(e["checkpoint"]) for s, e in results["stages"].items()},
            "eval_dir": out / "data" / "eval",
        }
    return _CACHE["result"]
