"""Where imports go, and how long a function may be: the package's rules, checked on its source.

Imports sit at module top. An import inside a function is allowed only for

* a heavy optional third-party module named in ``LAZY_MODULES`` below, each with its reason (an extra
  that may not be installed, a platform-only package, or one that costs seconds to load and only one
  feature needs), so ``import mobilemllm`` stays fast and a missing backend fails where it is used, with
  a clear message; or
* a line that says why itself, with a ``# lazy: <reason>`` comment (for instance the command modules
  of ``mobilemllm/cli/``, which load their implementation on call so that ``mobilemllm --help`` does not
  import torch).

A function longer than ``MAX_FUNCTION_LINES`` says why in its docstring ("Long because ...").
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mobilemllm"

# The one table of third-party modules that may be imported inside a function: top-level name -> why.
LAZY_MODULES: dict[str, str] = {
    "executorch": "seconds to load, registers custom ops; only exporting or running a .pte needs it",
    "pytorch_tokenizers": "ships with ExecuTorch; only the C++-tokenizer check of an ExecuTorch export needs it",
    "torchao": "loads quantization kernels at import; only quantizing for export needs it",
    "coremltools": "installed on macOS and x86-64 Linux only (pyproject marker); only Core ML export needs it",
    "onnx": "only ONNX export and graph inspection need it",
    "onnxscript": "only ONNX export needs it (torch.onnx's exporter)",
    "onnxruntime": "loads its native library at import; only ONNX export and the ONNX runner need it",
    "onnxruntime_genai": "the `genai` extra, may not be installed; only `decoder: genai` ONNX export needs it",
    "gguf": "the `gguf` extra, may not be installed; only --target gguf needs it",
    "llama_cpp": "the `gguf` extra (built from source), may not be installed; only the GGUF runner needs it",
    "peft": "the `train` extra, may not be installed; only LoRA training needs it",
    "transformers": "seconds to load (model registry, torch); configs and helpers of models/ load without it",
    "matplotlib": "only `bench --plot` needs it; slow to load",
    "selenium": "dev extra; only the browser test of the web demo needs it",
    "scipy": "scipy.stats takes seconds to load; only the caption hallucination intervals need it",
}
LAZY_TAG = re.compile(r"#\s*lazy:\s*\S")
MAX_FUNCTION_LINES = 80
LONG_REASON = "Long because"


def _source_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def _function_imports(tree: ast.AST):
    """Import statements whose nearest enclosing scope is a function (at any depth)."""
    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function:
                yield child
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            yield from walk(child, inside)
    yield from walk(tree, False)


def _imported_roots(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name.split(".")[0] for alias in node.names]
    if node.level:
        return ["mobilemllm"]  # a relative import is the package itself
    return [(node.module or "").split(".")[0]]


def import_violations(source: str) -> list[tuple[int, str]]:
    """(line, statement) of every import inside a function that the policy does not allow."""
    lines = source.splitlines()
    out = []
    for node in _function_imports(ast.parse(source)):
        text = lines[node.lineno - 1:node.end_lineno]
        if any(LAZY_TAG.search(line) for line in text):
            continue
        if all(root in LAZY_MODULES for root in _imported_roots(node)):
            continue
        out.append((node.lineno, " ".join(part.strip() for part in text)))
    return out


def long_functions(source: str) -> list[tuple[int, str, int]]:
    """(line, name, length) of every function over MAX_FUNCTION_LINES whose docstring gives no reason."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        length = node.end_lineno - start + 1
        if length > MAX_FUNCTION_LINES and LONG_REASON not in (ast.get_docstring(node) or ""):
            out.append((node.lineno, node.name, length))
    return out


def _report(found: dict[str, list]) -> str:
    return "\n".join(f"{path}:{item[0]}: {item[1:]}" for path, items in found.items() for item in items)


def test_imports_inside_functions_are_optional_backends_or_say_why():
    found = {}
    for path in _source_files():
        bad = import_violations(path.read_text())
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    assert not found, ("imports inside functions that belong at module top (or name a LAZY_MODULES entry, "
                       "or carry `# lazy: <reason>`):\n" + _report(found))


def test_functions_are_short_or_say_why():
    found = {}
    for path in _source_files():
        bad = long_functions(path.read_text())
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    assert not found, (f"functions over {MAX_FUNCTION_LINES} lines without '{LONG_REASON}' in the docstring:\n"
                       + _report(found))


@pytest.mark.parametrize("source, bad", [
    ("import os\ndef f():\n    import json\n", [3]),
    ("def f():\n    from mobilemllm.config import ModelConfig\n", [2]),
    ("def f():\n    from . import config\n", [2]),
    ("def f():\n    def g():\n        import torch\n", [3]),
    ("def f():\n    import executorch.runtime\n    from onnxruntime import InferenceSession\n", []),
    ("def f():\n    import torch, executorch\n", [2]),
    ("def f():\n    from mobilemllm.export import pipeline  # lazy: cli startup\n", []),
    ("def f():\n    from mobilemllm.export import (\n        pipeline)  # lazy: cli startup\n", []),
    ("def f():\n    import json  # lazy:\n", [2]),
    ("class A:\n    def m(self):\n        import json\n", [3]),
    ("import json\nclass A:\n    import os\n", []),
])
def test_import_rule_flags_what_it_should(source, bad):
    assert [line for line, _ in import_violations(source)] == bad


def test_length_rule_flags_what_it_should():
    body = "".join(f"    x{i} = {i}\n" for i in range(MAX_FUNCTION_LINES))
    assert [name for _, name, _ in long_functions(f"def f():\n{body}")] == ["f"]
    assert long_functions(f"def f():\n{body[:-len('    x79 = 79')-1]}") == []
    assert long_functions(f'def f():\n    """Long because a table."""\n{body}') == []
    assert [n for _, n, _ in long_functions(f"class A:\n    def m(self):\n    {body.replace(chr(10), chr(10) + '    ')}")] \
        == ["m"]


def test_cli_startup_does_not_load_heavy_modules():
    """`mobilemllm --help` answers in a fraction of a second because loading the command table imports
    neither torch nor any LAZY_MODULES entry."""
    heavy = sorted({"torch", *LAZY_MODULES})
    code = ("import sys, mobilemllm.cli\n"
            f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({heavy!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]", out.stdout
