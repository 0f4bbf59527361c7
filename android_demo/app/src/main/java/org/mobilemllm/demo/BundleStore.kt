package org.mobilemllm.demo

import java.io.File

/** Bundles pushed with `mobilemllm push --target android` live in /data/local/tmp/mobilemllm/<name>/. */
object BundleStore {
    const val ROOT = "/data/local/tmp/mobilemllm"

    class Bundle(val dir: File, val manifest: BundleManifest) {
        val programPath: String get() = File(dir, manifest.programFile).path
        // The tokenizer *file*: LlmModule's constructor refuses any path that is not a readable file
        // (ExecuTorchRuntime.validateFilePath), a folder included.
        val tokenizerPath: String get() = File(dir, manifest.tokenizerFile).path
    }

    /** Folder names that hold a manifest.json (a push still in progress is in <name>.partial, skipped). */
    fun list(root: File = File(ROOT)): List<String> =
        (root.listFiles() ?: emptyArray())
            .filter { it.isDirectory && !it.name.endsWith(".partial") && File(it, "manifest.json").isFile }
            .map { it.name }
            .sorted()

    /** Read and check a bundle; every problem is a ManifestError with a message for the user. */
    fun open(name: String, root: File = File(ROOT)): Bundle {
        val dir = File(root, name)
        val manifestFile = File(dir, "manifest.json")
        if (!manifestFile.isFile) {
            throw ManifestError("no bundle at ${dir.path}: push one with `mobilemllm push --bundle DIR --target android`")
        }
        val manifest = BundleManifest.parse(manifestFile.readText())
        val problems = manifest.fileSizes.mapNotNull { (rel, size) ->
            val f = File(dir, rel)
            when {
                !f.isFile -> "$rel is missing"
                f.length() != size -> "$rel is ${f.length()} bytes, the manifest says $size"
                else -> null
            }
        }
        if (problems.isNotEmpty()) {
            throw ManifestError("the bundle in ${dir.path} is incomplete: ${problems.joinToString("; ")}. Push it again")
        }
        return Bundle(dir, manifest)
    }
}
