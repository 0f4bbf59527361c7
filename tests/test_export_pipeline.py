"""The export pipeline itself, with a stand-in format plug-in: the order of the steps, the check before any
weights load, the parity gate (nothing written unless --force) and the staging folder cleaned up."""

from __future__ import annotations

import pytest

from conftest import make_tiny_model
from mobilemllm.errors import ConfigError, UserError
from mobilemllm.export import parity as P
from mobilemllm.export.plugin import ExportFormat


class Toy(ExportFormat):
    """Writes one file; its parity check fails unless the recipe lowers the gate."""

    name, label = "toy", "Toy"
    recipe_keys = ("name", "format", "parity", "quantization")
    parity_keys = ("min_logit_cosine",)

    def __init__(self):
        self.calls: list[str] = []

    def check(self, recipe):
        return [] if recipe.get("name") != "bad" else ["the toy format refuses the name bad"]

    def prepare(self, job):
        self.calls.append("prepare")

    def modules(self, job):
        self.calls.append("modules")
        return {"text_decoder": object()}

    def quantize_modules(self, job, modules):
        self.calls.append("quantize_modules")
        job.qinfo = {part: {"scheme": job.plan.scheme(part)} for part in job.plan.parts}
        return modules

    def convert(self, job, modules):
        self.calls.append("convert")
        (job.staging / "toy.bin").write_bytes(b"toy")

    def quantize_files(self, job):
        self.calls.append("quantize_files")

    def manifest(self, job):
        self.calls.append("manifest")
        return {"export": {"backend": "toy"}}

    def parity(self, job, manifest):
        self.calls.append("parity")
        assert manifest["quantization"] == job.qinfo and manifest["export"]["backend"] == "toy"
        gate = float(job.parity_recipe.get("min_logit_cosine", 0.99))
        return [P.check("logit_cosine", 0.5, gate, 0.5 >= gate)], None


@pytest.fixture
def toy(monkeypatch):
    from mobilemllm import quantization as Q
    from mobilemllm.export import pipeline

    fmt = Toy()
    monkeypatch.setitem(pipeline.FORMATS, "toy", fmt)
    monkeypatch.setitem(Q.SUPPORT, "toy", dict(Q.SUPPORT["onnx"]))  # its parts take ONNX's schemes
    return fmt


def test_steps_run_in_order_and_a_failed_gate_writes_nothing(toy, tmp_path, tiny_tokenizer):
    from mobilemllm.export.pipeline import export_bundle

    logs: list[str] = []
    recipe = {"name": "t", "format": "toy", "quantization": {"text_decoder": "int8"}}
    with pytest.raises(UserError, match=r"Toy export failed parity against eager: logit_cosine = 0.5 \(needs 0.99\)"
                                        r".*--force"):
        export_bundle(make_tiny_model(), recipe, tmp_path / "b", tokenizer=tiny_tokenizer, log=logs.append)
    assert toy.calls == ["prepare", "modules", "quantize_modules", "convert", "quantize_files", "manifest", "parity"]
    assert not list(tmp_path.iterdir())  # no bundle, no staging folder
    assert "parity logit_cosine: 0.5 (needs 0.99)" in logs


def test_recipe_checked_before_the_model_loads(toy, tmp_path, monkeypatch):
    import mobilemllm.api
    from mobilemllm.export.pipeline import export_bundle

    def no_load(*a, **k):
        raise AssertionError("weights were loaded before the recipe check")

    monkeypatch.setattr(mobilemllm.api, "load", no_load)
    bad = {"name": "bad", "format": "toy", "quantization": {"token_embedding": "int4"}, "extra": 1,
           "parity": {"greedy_tokens": 3}}
    with pytest.raises(ConfigError) as e:
        export_bundle("tiny", bad, tmp_path / "b")
    msg = str(e.value)
    assert msg.startswith("invalid Toy recipe 'bad': ") and "\n" not in msg
    for part in ("unknown key(s) extra", "parity takes only min_logit_cosine", "refuses the name bad",
                 "token_embedding cannot be int4"):
        assert part in msg  # every problem, on one line
    with pytest.raises(ConfigError, match="unknown export format 'tflite'; valid: executorch, onnx, coreml.*toy"):
        export_bundle("tiny", {"format": "tflite"}, tmp_path / "b")
    assert not list(tmp_path.iterdir()) and toy.calls == []
