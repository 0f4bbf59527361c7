"""The bundle contract: what export writes and everything downstream reads.

A bundle is a folder with the model file(s), ``tokenizer/`` and ``manifest.json``. This package owns
its names (:mod:`.layout`), the manifest's schema and checks (:mod:`.manifest`), atomic writing
(:mod:`.writer`), the prompt it describes (:mod:`.prompt`) and the reference of what an app does
with it before calling the runner (:mod:`.app_inputs`). It imports nothing above ``config``/``errors``,
so export, the runtime, the benchmark, the demo and the apps' tests all read it without importing export.
"""

from mobilemllm.bundle.layout import (FORMATS, GRAPH_FILES, IGNORE_INDEX, IMAGE_TOKEN_ID, MANIFEST_NAME,
                                      PROGRAM_NAME, QUESTION, SCHEMA_VERSION, TOKENIZER_DIR)
from mobilemllm.bundle.manifest import (BundleError, file_table, load_manifest, manifest_schema, schema_errors,
                                        sha256_file, validate_manifest, verify_files)
from mobilemllm.bundle.prompt import fill_prompt, needs_bos_token, prompt_token_ids
from mobilemllm.bundle.writer import check_out_dir, discard, finish_bundle, new_bundle_dir, write_bundle

__all__ = [
    "FORMATS", "GRAPH_FILES", "IGNORE_INDEX", "IMAGE_TOKEN_ID", "MANIFEST_NAME", "PROGRAM_NAME", "QUESTION",
    "SCHEMA_VERSION", "TOKENIZER_DIR", "BundleError", "file_table", "load_manifest", "manifest_schema",
    "schema_errors", "sha256_file", "validate_manifest", "verify_files", "fill_prompt", "needs_bos_token",
    "prompt_token_ids", "check_out_dir", "discard", "finish_bundle", "new_bundle_dir", "write_bundle",
]
