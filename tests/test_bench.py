"""`mobilemllm bench`: the metric helpers, the harness on every backend with the tiny model, the JSON/CSV
schemas, the PNG plot, the adb command lines and errors, and the stats-line parser on real runner output.

``tests/data/executorch_runner_output.txt`` is what ExecuTorch 1.5.1's C++ ``MultimodalRunner`` printed
(stdout + stderr, captured at the file-descriptor level) for two generations of a tiny fp32 bundle:
``MultimodalRunner(model.pte, tokenizer/).generate([text "USER: ", image, text "\\nWhat shape is in the
image? ASSISTANT:"], GenerationConfig(max_new_tokens=8 then 16, temperature=0, num_bos=1))``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from mobilemllm.bench import timing
from mobilemllm.errors import BackendUnavailable, UserError

DATA = Path(__file__).parent / "data"
PROMPT, NEW, VISUAL = 24, 8, 16  # tiny test model: 16 visual tokens


# ---- metrics ---------------------------------------------------------------------------------------
def test_percentiles_and_summary_match_numpy():
    xs = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    for q in (0, 10, 50, 90, 100):
        assert timing.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))
    s = timing.summarize(xs + [None])
    assert (s.n, s.median, s.min, s.max) == (6, 3.5, 1.0, 10.0)
    assert s.p10 == pytest.approx(np.percentile(xs, 10)) and s.p90 == pytest.approx(np.percentile(xs, 90))
    assert timing.summarize([None, None]) is None
    with pytest.raises(ValueError):
        timing.percentile([], 50)


def test_rates_and_ttft():
    assert timing.tokens_per_second(128, 2.0) == 64.0
    assert timing.tokens_per_second(128, 0.0) is None and timing.tokens_per_second(0, 1.0) is None
    assert timing.time_to_first_token(10.0, 10.25) == 0.25
    with pytest.raises(ValueError):
        timing.time_to_first_token(10.0, 9.0)
    assert timing.prefill_tokens(128, 144) == 272


def test_runner_rates_use_the_wall_clock_when_ms_ticks_are_too_coarse():
    from mobilemllm.runtime.rates import rates, wall_rates

    # a sub-millisecond run: every ms tick is the same, so the stats alone make no rate (None, never 0.0)
    stats = {"inference_start_ms": 1000, "prompt_eval_end_ms": 1000, "first_token_ms": 1000,
             "inference_end_ms": 1000, "prompt_tokens": 35, "generated_tokens": 3}
    assert rates(stats)["decode_tokens_per_s"] is None
    assert rates({}) == {"ttft_s": None, "prefill_tokens_per_s": None, "decode_tokens_per_s": None}
    assert wall_rates(stats, 10.0, [10.0004], 10.0005)["decode_tokens_per_s"] is None  # one token: no decode step
    r = wall_rates(stats, 10.0, [10.0004, 10.0005, 10.0006, 10.0007], 10.0008)
    assert r["ttft_s"] == pytest.approx(0.0004)
    assert r["decode_tokens_per_s"] == pytest.approx(3 / 0.0003)
    assert r["prefill_tokens_per_s"] == pytest.approx(35 / 0.0004)
    # a long prefill keeps the runner's own prefill span (it excludes image encoding time on the wall clock)
    stats.update(prompt_eval_end_ms=1200, first_token_ms=1201, inference_end_ms=1300)
    r = wall_rates(stats, 10.0, [10.25, 10.3], 10.31)
    assert r["prefill_tokens_per_s"] == pytest.approx(35 / 0.2)
    assert r["decode_tokens_per_s"] == pytest.approx(1 / 0.05)


def test_peak_rss_sees_a_large_allocation_after_reset(tmp_path):
    if not timing.reset_peak_rss():
        pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
    base = timing.peak_rss_bytes()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    assert timing.peak_rss_bytes() >= base + 60 * 2**20
    del block
    (tmp_path / "a").write_bytes(b"x" * 1000)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b").write_bytes(b"y" * 24)
    assert timing.size_on_disk(tmp_path) == 1024


# ---- prompt and roofline ------------------------------------------------------------------------------
def test_prompt_has_the_exact_text_token_count(tiny_tokenizer):
    from mobilemllm.bench.prompt import build_prompt, check_context
    from mobilemllm.templates import get_template

    tpl = get_template("vicuna_short")
    p = build_prompt(40, VISUAL, tokenizer=tiny_tokenizer, prefix_text=tpl.prompt_prefix(),
                     suffix_text=tpl.prompt_suffix(""), bos_id=tiny_tokenizer.bos_token_id, filler=7)
    assert p.text_tokens == 40 and p.prefill_tokens == 56 and p.prefix_ids[0] == tiny_tokenizer.bos_token_id
    with pytest.raises(UserError, match="shorter than the template"):
        build_prompt(2, VISUAL, tokenizer=tiny_tokenizer, prefix_text=tpl.prompt_prefix(),
                     suffix_text=tpl.prompt_suffix(""), bos_id=1)
    with pytest.raises(UserError, match=r"exceeds its context of 64; use --prompt-tokens \d+ or fewer"):
        check_context(p, 16, 64, "bundle x")


def test_decoder_bytes_match_the_eager_model(tiny_model):
    from mobilemllm.bench.backends.pytorch import eager_decode_bytes_per_token
    from mobilemllm.bench.roofline import decoder_weight_bytes, kv_cache_bytes, scheme_bytes_per_weight

    cfg = tiny_model.config.llm
    assert eager_decode_bytes_per_token(tiny_model, 100) == decoder_weight_bytes(cfg, "fp32") + kv_cache_bytes(cfg, 100)
    assert scheme_bytes_per_weight("8da4w", 32) == 0.5 + 4 / 32
    assert decoder_weight_bytes(cfg, "8da4w", 32) < decoder_weight_bytes(cfg, "fp32") / 5


def test_bandwidth_is_plausible_and_sets_the_ceiling():
    from mobilemllm.bench.roofline import measure_bandwidth, roofline

    bw = measure_bandwidth(nbytes=64 * 2**20, repeats=3)
    assert 2e8 < bw < 2e12  # 0.2 GB/s .. 2 TB/s
    r = roofline(10**6, 10e9, 2500.0, "given")
    assert r.ceiling_tok_s == 10_000 and r.fraction == 0.25


def test_ratios_compare_with_the_first_row_of_the_same_model():
    from mobilemllm.bench.harness import CaseInfo, CaseResult, Repetition
    from mobilemllm.bench.report import ratio, reference_for, result_document

    def case(model, decode_s):
        rep = Repetition(prefill_tokens=80, decode_tokens=100, ttft_s=0.1, prefill_s=0.05, decode_s=decode_s,
                         total_s=0.1 + decode_s)
        return CaseResult(label=model, backend="pytorch", target=model, info=CaseInfo(model_name=model), load_s=1.0,
                          peak_rss_bytes=1, prompt_tokens=64, new_tokens=100, threads=1, repetitions=[rep], warmup=0)

    cases = [case("tiny", 1.0), case("tiny", 0.5), case("bench", 4.0), case("bench", 1.0)]
    assert [cases.index(reference_for(c, cases)) for c in cases] == [0, 0, 2, 2]
    assert ratio(cases[1], cases[0], "decode_tok_s") == pytest.approx(2.0)
    assert ratio(cases[3], cases[2], "decode_tok_s") == pytest.approx(4.0)
    doc = result_document(cases, {"device": "host"}, {})
    assert [c["ratios"]["reference"] for c in doc["cases"]] == [0, 0, 2, 2]
    assert doc["cases"][3]["ratios"]["decode_tok_s"] == pytest.approx(4.0)


def test_busy_warning_discounts_the_benchmark_s_own_threads():
    """The load average is read after the run: a quiet 2-core box benched at 2 threads shows ~2.3 of its own;
    only load beyond the benchmark's threads makes the machine busy."""
    from mobilemllm.bench.report import busy_warning

    assert busy_warning({"load_average": [2.3, 2.0, 2.2], "cores_usable": 2, "threads": 2}) is None
    assert busy_warning({"load_average": [1.2, 1.0, 1.0], "cores_usable": 2, "threads": 1}) is None
    line = busy_warning({"load_average": [4.1, 3.9, 3.5], "cores_usable": 2, "threads": 2})
    assert line.startswith("warning: the machine was busy (load average 4.1 on 2 cores, 2 of it")
    assert busy_warning({"load_average": [2.6, 2.0, 2.0], "cores_usable": 2, "threads": 1})  # 1.6 not ours
    assert busy_warning({"load_average": None, "cores_usable": 2}) is None


# ---- the stats line ----------------------------------------------------------------------------------
def test_parser_reads_real_runner_output():
    from mobilemllm.bench.adb import parse_observer_lines, stats_to_repetition

    text = (DATA / "executorch_runner_output.txt").read_text()
    stats = parse_observer_lines(text)
    assert [(s["prompt_tokens"], s["generated_tokens"]) for s in stats] == [(29, 7), (29, 15)]
    rep = stats_to_repetition(stats[1])
    assert rep.prefill_tokens == 29 and rep.decode_tokens == 15
    assert rep.ttft_s == (stats[1]["first_token_ms"] - stats[1]["inference_start_ms"]) / 1000
    assert rep.total_s >= rep.ttft_s >= 0 and rep.image_encode_s is None


def test_parser_rejects_a_broken_stats_line():
    from mobilemllm.bench.adb import parse_observer_lines

    assert parse_observer_lines("no stats here\n") == []
    with pytest.raises(UserError, match="malformed runner stats line"):
        parse_observer_lines('text PyTorchObserver {"prompt_tokens":1,\n')  # cut short
    with pytest.raises(UserError, match="not valid JSON"):
        parse_observer_lines('PyTorchObserver {"prompt_tokens":1,}\n')
    with pytest.raises(UserError, match="lacks"):
        parse_observer_lines('PyTorchObserver {"prompt_tokens": 3}\n')


# ---- adb ------------------------------------------------------------------------------------------
def test_adb_device_parsing_and_errors():
    from mobilemllm.bench.adb import parse_adb_devices, parse_device, pick_serial

    assert parse_device("host") == ("host", None) and parse_device("adb:R5CT") == ("adb", "R5CT")
    with pytest.raises(UserError, match="unknown --device"):
        parse_device("phone")
    devs = parse_adb_devices("List of devices attached\nR5CT\tdevice\nemulator-5554\tunauthorized\n\n")
    assert devs == [("R5CT", "device"), ("emulator-5554", "unauthorized")]
    assert pick_serial(devs, None) == "R5CT"
    with pytest.raises(BackendUnavailable, match="unauthorized"):
        pick_serial(devs, "emulator-5554")
    with pytest.raises(BackendUnavailable, match="no Android device is ready"):
        pick_serial([], None)


def test_adb_plan_command_lines(tmp_path):
    from mobilemllm.bench.adb import AdbPlan

    manifest = {"files": {"model.pte": {}, "tokenizer/tokenizer.json": {}}, "tokenizer": {"dir": "tokenizer"}}
    plan = AdbPlan(adb="adb", serial="R5CT", bundle=tmp_path / "tiny et", runner=tmp_path / "llava_main",
                   image=tmp_path / "image.png", prompt="the the it's", seq_len=200, threads=4, runs=3)
    d = "/data/local/tmp/mobilemllm/tiny_et"
    assert plan.setup_commands(manifest) == [
        ["adb", "-s", "R5CT", "shell", f"mkdir -p {d}"],
        ["adb", "-s", "R5CT", "push", str(tmp_path / "tiny et" / "model.pte"), f"{d}/model.pte"],
        ["adb", "-s", "R5CT", "push", str(tmp_path / "tiny et" / "tokenizer/tokenizer.json"), f"{d}/tokenizer.json"],
        ["adb", "-s", "R5CT", "push", str(tmp_path / "image.png"), f"{d}/image.png"],
        ["adb", "-s", "R5CT", "push", str(tmp_path / "llava_main"), f"{d}/runner"],
        ["adb", "-s", "R5CT", "shell", f"chmod 755 {d}/runner"],
    ]
    assert plan.run_command(2) == ["adb", "-s", "R5CT", "shell",
                                   f"cd {d} && ./runner --model_path model.pte --tokenizer_path tokenizer.json "
                                   "--image_path image.png --prompt 'the the it'\"'\"'s' --temperature 0 "
                                   "--seq_len 200 --cpu_threads 4 > run_2.log 2>&1"]
    assert plan.pull_command(2, tmp_path) == ["adb", "-s", "R5CT", "pull", f"{d}/run_2.log",
                                              str(tmp_path / "run_2.log")]


def test_device_adb_without_adb_is_one_clear_error(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    from mobilemllm.cli import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no adb anywhere
    code = main(["bench", "--model", str(tiny_checkpoint), "--device", "adb", "--json", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert code == 1
    assert "needs Android's `adb` on PATH" in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()


def test_runner_binary_lookup(tmp_path, monkeypatch):
    from mobilemllm.bench import adb

    monkeypatch.setattr(adb, "DEFAULT_RUNNER", tmp_path / "none")
    monkeypatch.delenv(adb.RUNNER_ENV, raising=False)
    with pytest.raises(BackendUnavailable, match="--runner PATH"):
        adb.find_runner(None)
    with pytest.raises(UserError, match="does not exist"):
        adb.find_runner(str(tmp_path / "missing"))
    (tmp_path / "llava_main").write_bytes(b"\x7fELF")
    monkeypatch.setenv(adb.RUNNER_ENV, str(tmp_path / "llava_main"))
    assert adb.find_runner(None) == tmp_path / "llava_main"


# ---- choices are checked before work -----------------------------------------------------------------------
def test_bad_choices_fail_before_loading(tiny_checkpoint, tmp_path):
    from mobilemllm.bench.plan import plan_cases

    with pytest.raises(UserError, match="valid backends"):
        plan_cases([], [str(tiny_checkpoint)], ["tensorrt"])
    with pytest.raises(UserError, match="nothing to benchmark"):
        plan_cases([], [], [])
    with pytest.raises(UserError, match="add --model"):
        plan_cases([], [], ["pytorch"])
    with pytest.raises(UserError, match="not a preset"):
        plan_cases([], [str(tmp_path / "nope")], [])
    with pytest.raises(UserError, match="does not exist"):
        plan_cases([str(tmp_path / "nope")], [], [])
    assert [c.backend for c in plan_cases([], [str(tiny_checkpoint), "tiny"], [])] == ["pytorch", "pytorch"]


def test_bad_numbers_are_reported_together(tiny_checkpoint, capsys):
    from mobilemllm.cli import main

    code = main(["bench", "--model", str(tiny_checkpoint), "--repeat", "0", "--new-tokens", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--new-tokens must be at least 1" in err and "--repeat must be at least 1" in err


def test_context_overflow_names_the_fix(tiny_checkpoint, capsys):
    from mobilemllm.cli import main

    code = main(["bench", "--model", str(tiny_checkpoint), "--prompt-tokens", "200", "--new-tokens", "128",
                 "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "exceeds its context of 256" in err and "--prompt-tokens" in err


# ---- backends on the tiny model --------------------------------------------------------------------------
def check_case(res, new_tokens=NEW, prompt_tokens=PROMPT, repeat=2, image_timed=True):
    """Sane, positive numbers of the right shape."""
    assert len(res.repetitions) == repeat
    for r in res.repetitions:
        assert r.prefill_tokens == prompt_tokens + VISUAL
        assert r.decode_tokens == new_tokens
        assert 0 < r.ttft_s <= r.total_s and r.decode_s > 0 and r.prefill_s > 0
        assert r.decode_tok_s > 0 and r.prefill_tok_s > 0
        assert (r.image_encode_s is not None and r.image_encode_s > 0) == image_timed
    assert res.load_s > 0 and res.peak_rss_bytes > 50 * 2**20
    assert res.info.decode_bytes_per_token > 0 and res.info.num_visual_tokens == VISUAL
    assert res.info.size_bytes > 0 and not [n for n in res.info.notes if "instead of" in n]


def run(backend, target, **kw):
    from mobilemllm.bench.backends import make_backend
    from mobilemllm.bench.harness import run_case

    return run_case(make_backend(backend, str(target), threads=kw.pop("threads", None)), label="t",
                    prompt_tokens=kw.pop("prompt_tokens", PROMPT), new_tokens=kw.pop("new_tokens", NEW),
                    warmup=kw.pop("warmup", 1), repeat=kw.pop("repeat", 2))


def test_pytorch_backend(tiny_checkpoint):
    res = run("pytorch", tiny_checkpoint)
    check_case(res)
    assert res.info.format == "pytorch" and res.info.quantization == "fp32"


@pytest.fixture(scope="session")
def et_bundle(tmp_path_factory, tiny_checkpoint):
    """The tiny checkpoint exported for Android (XNNPACK, fp32) by the project's own exporter."""
    pytest.importorskip("executorch")
    from mobilemllm.export.pipeline import export_bundle
    from mobilemllm.models.checkpoint import load_checkpoint

    model, tok = load_checkpoint(tiny_checkpoint)
    out = tmp_path_factory.mktemp("bench") / "tiny-et"
    recipe = {"name": "android", "format": "executorch", "backend": "xnnpack"}
    return export_bundle(model, recipe, out, tokenizer=tok, log=lambda s: None)


@pytest.fixture(scope="session")
def onnx_bundle(tmp_path_factory, tiny_checkpoint):
    pytest.importorskip("onnxruntime")
    from mobilemllm.export.pipeline import export_bundle
    from mobilemllm.models.checkpoint import load_checkpoint

    model, tok = load_checkpoint(tiny_checkpoint)
    recipe = {"name": "onnx", "format": "onnx", "quantization": "fp32"}
    return export_bundle(model, recipe, tmp_path_factory.mktemp("bench") / "tiny-onnx", tokenizer=tok,
                         log=lambda s: None)


@pytest.mark.slow
def test_executorch_runner_backend(et_bundle):
    res = run("executorch", et_bundle, threads=1)
    check_case(res)  # the image encode is timed apart from the runner's prefill
    assert all(r.prefill_s + r.image_encode_s == pytest.approx(r.ttft_s) for r in res.repetitions)
    for r in res.repetitions:  # the C++ runner's own count agrees with ours
        assert r.runner_stats["prompt_tokens"] == PROMPT + VISUAL and r.runner_stats["generated_tokens"] == NEW


@pytest.mark.slow
def test_executorch_methods_backend(et_bundle):
    res = run("executorch-methods", et_bundle)
    check_case(res)
    m = res.repetitions[0].methods
    assert m["vision_encoder"]["calls"] == 1 and m["text_decoder"]["calls"] == 1 + NEW
    assert m["token_embedding"]["calls"] == 2 + NEW
    assert sum(v["seconds"] for v in m.values()) <= res.repetitions[0].total_s


@pytest.mark.slow
def test_onnxruntime_backend(onnx_bundle):
    res = run("onnxruntime", onnx_bundle)
    check_case(res)
    assert res.info.format == "onnx" and res.repetitions[0].methods["text_decoder"]["calls"] == 1 + NEW


# ---- the CLI: a matrix, JSON / CSV / PNG ----------------------------------------------------------------
def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def check_outputs(tmp_path, n_cases: int, repeat: int):
    import jsonschema
    from PIL import Image

    from mobilemllm.bench.report import CSV_COLUMNS, RESULT_SCHEMA

    doc = json.loads((tmp_path / "r.json").read_text())
    jsonschema.validate(doc, RESULT_SCHEMA)
    assert len(doc["cases"]) == n_cases
    assert doc["machine"]["cores"] == os.cpu_count() and doc["machine"]["versions"]["torch"]
    for c in doc["cases"]:
        assert len(c["repetitions"]) == repeat
        assert [r["decode_tokens"] for r in c["repetitions"]] == [NEW] * repeat
        assert c["summary"]["decode_tok_s"]["median"] > 0
        assert c["roofline"]["ceiling_tok_s"] > 0 and c["roofline"]["fraction"] > 0
    with open(tmp_path / "r.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == CSV_COLUMNS and len(rows) == n_cases * repeat
    assert {int(r["prefill_tokens"]) for r in rows} == {PROMPT + VISUAL}
    assert all(float(r["decode_tok_s"]) > 0 for r in rows)
    w, h = png_size(tmp_path / "r.png")
    assert w > 500 and h > 200
    with Image.open(tmp_path / "r.png") as im:
        im.verify()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary files left
    return doc


def bench_args(tmp_path, *extra):
    return ["bench", *extra, "--prompt-tokens", str(PROMPT), "--new-tokens", str(NEW), "--warmup", "1",
            "--repeat", "2", "--quiet", "--json", str(tmp_path / "r.json"), "--csv", str(tmp_path / "r.csv"),
            "--plot", str(tmp_path / "r.png")]


def test_cli_pytorch_writes_json_csv_png(tiny_checkpoint, tmp_path, capsys):
    from mobilemllm.cli import main

    assert main(bench_args(tmp_path, "--model", str(tiny_checkpoint), "--bandwidth", "76.8")) == 0
    out = capsys.readouterr().out
    assert "decode tok/s" in out and "given (--bandwidth)" in out
    doc = check_outputs(tmp_path, 1, 2)
    assert doc["cases"][0]["roofline"]["bandwidth_bytes_s"] == 76.8e9


@pytest.mark.slow
def test_cli_matrix_of_every_backend(tiny_checkpoint, et_bundle, onnx_bundle, tmp_path, capsys):
    from mobilemllm.cli import main

    args = bench_args(tmp_path, "--model", str(tiny_checkpoint), "--bundle", str(et_bundle), "--bundle",
                      str(onnx_bundle), "--backend", "pytorch", "--backend", "executorch", "--backend",
                      "executorch-methods", "--backend", "onnxruntime")
    assert main(args) == 0
    out = capsys.readouterr().out
    doc = check_outputs(tmp_path, 4, 2)
    assert [c["backend"] for c in doc["cases"]] == ["pytorch", "executorch", "executorch-methods", "onnxruntime"]
    assert "×" in out  # ratios against row 1
    for line in ("tiny-et", "tiny-onnx", "measured on this host"):
        assert line in out


@pytest.mark.slow
def test_quantized_bundle_benches_in_a_fresh_process(tiny_checkpoint, tmp_path):
    """A 4-bit embedding needs ExecuTorch's quantized kernels registered in the bench's own process: in a
    fresh interpreter (nothing imported by other tests) the runner used to fail with "Missing operator:
    quantized_decomposed::embedding_4bit.out"."""
    import subprocess
    import sys

    from mobilemllm.export.pipeline import export_bundle
    from mobilemllm.models.checkpoint import load_checkpoint

    model, tok = load_checkpoint(tiny_checkpoint)
    recipe = {"name": "android", "format": "executorch", "backend": "xnnpack",
              "quantization": {"text_decoder": {"scheme": "8da4w", "group_size": 32},
                               "token_embedding": {"scheme": "embedding4", "group_size": 32}}}
    bundle = export_bundle(model, recipe, tmp_path / "q", tokenizer=tok, force=True, log=lambda s: None)
    args = [sys.executable, "-m", "mobilemllm", *bench_args(tmp_path, "--bundle", str(bundle), "--backend",
                                                            "executorch", "--backend", "executorch-methods")]
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    doc = check_outputs(tmp_path, 2, 2)
    assert all(c["info"]["quantization"].startswith("8da4w") for c in doc["cases"])


@pytest.mark.slow
def test_bundle_backend_mismatches_fail_before_loading(et_bundle, onnx_bundle, tmp_path):
    import shutil

    from mobilemllm.bench.plan import plan_cases

    with pytest.raises(UserError, match="none of --backend executorch reads it"):
        plan_cases([str(onnx_bundle)], [], ["executorch"])
    assert [c.backend for c in plan_cases([str(et_bundle), str(onnx_bundle)], [], [])] == ["executorch", "onnxruntime"]
    coreml = tmp_path / "coreml"
    shutil.copytree(et_bundle, coreml)
    manifest = json.loads((coreml / "manifest.json").read_text())
    manifest["export"]["backend"] = "coreml"
    (coreml / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BackendUnavailable, match="only on Apple hardware"):
        plan_cases([str(coreml)], [], [])


def test_runner_pieces_are_ascii_and_carry_the_bytes(tiny_tokenizer):
    """The ExecuTorch backend's runner decodes with this folder: every piece is ASCII (so pybind11's str() of a
    piece never fails mid-character) and the pieces of a multi-byte text give back its exact UTF-8 bytes."""
    from tokenizers import Tokenizer

    from mobilemllm.runtime.piece_tokenizer import PieceDecoder, decode_only_tokenizer_dir

    # keyed by the tokenizer's content, as the runners key it (by tokenizer.json's hash): the folder is cached
    key = hashlib.sha256(tiny_tokenizer.backend_tokenizer.to_str().encode()).hexdigest()
    folder = decode_only_tokenizer_dir(tiny_tokenizer, key)
    pieces_tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = "a red ✓ circle — é"
    ids = tiny_tokenizer.encode(text, add_special_tokens=False)
    got: list[bytes] = []
    dec = PieceDecoder(got.append)
    for i in ids:
        piece = pieces_tok.decode([i], skip_special_tokens=False)
        assert piece.isascii(), (i, piece)
        dec(piece)
    assert b"".join(got).decode("utf-8") == text
