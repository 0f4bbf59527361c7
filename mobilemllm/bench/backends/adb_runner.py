"""``--device adb``: an ExecuTorch bundle run by ExecuTorch's runner binary on an Android phone.

Numbers come from the runner's own stats line, pulled back from the phone. The binary builds the
prompt from text (``--prompt``), so the prompt is filler words sized to ``--prompt-tokens`` by the
bundle's tokenizer and the prefill count is the one the runner reports; the binary stops at EOS
(it has no ignore-EOS flag), so the decode count is what it reports too (see the notes column).
Untested here: this machine has no phone (the command lines and the parser are tested).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from PIL import Image

from mobilemllm.bench import adb as A
from mobilemllm.bench.backends.bundle_common import bundle_prompt, case_info, check_fits, read_bundle
from mobilemllm.bench.harness import Backend, Repetition
from mobilemllm.bench.prompt import BenchPrompt, bench_image
from mobilemllm.data.tokenizer import load_tokenizer


class AdbRunnerBackend(Backend):
    name = "executorch-adb"

    def __init__(self, target: str, threads: int | None = None, *, serial: str | None = None,
                 runner: str | None = None):
        super().__init__(target, threads)
        self.serial_wanted = serial
        self.runner_path = runner

    def load(self) -> None:
        self.bundle = Path(self.target)
        self.manifest = read_bundle(self.bundle, "executorch")
        runner = A.find_runner(self.runner_path)
        adb, serial = A.connect(self.serial_wanted)
        self.tokenizer = load_tokenizer(self.bundle / self.manifest["tokenizer"]["dir"])
        self.info = case_info(self.bundle, self.manifest)
        self.info.notes.append(f"on Android device {serial}")
        self.tmp = Path(tempfile.mkdtemp(prefix="mobilemllm-adb-"))

        pre = self.manifest["preprocessing"]
        Image.fromarray(bench_image(pre["image_size"])[0].transpose(1, 2, 0)).save(self.tmp / "image.png")
        self.plan_args = dict(adb=adb, serial=serial, bundle=self.bundle, runner=runner, image=self.tmp / "image.png")
        self.count = 0

    def prepare(self, prompt_tokens: int, new_tokens: int) -> BenchPrompt:
        self.prompt = bundle_prompt(self.manifest, self.tokenizer, prompt_tokens)
        check_fits(self.manifest, self.prompt, new_tokens, self.target)
        text = self.tokenizer.decode(self.prompt.suffix_ids, skip_special_tokens=True)
        self.plan = A.AdbPlan(**self.plan_args, prompt=text, seq_len=self.prompt.prefill_tokens + new_tokens + 1,
                              threads=self.threads, runs=0)
        for cmd in self.plan.setup_commands(self.manifest):
            A._check(cmd)
        return self.prompt

    def run_once(self) -> Repetition:
        i = self.count
        self.count += 1
        A._check(self.plan.run_command(i))
        A._check(self.plan.pull_command(i, self.tmp))
        stats = A.parse_observer_lines((self.tmp / f"run_{i}.log").read_text(errors="replace"))
        if not stats:
            raise RuntimeError(f"the runner on the phone printed no PyTorchObserver line; see {self.tmp}/run_{i}.log")
        if i == 0:
            self.load_s_override = A.load_seconds(stats[-1])
        return A.stats_to_repetition(stats[-1])

    def close(self) -> None:
        try:
            A._check(self.plan.cleanup_command())
        except Exception:
            pass
