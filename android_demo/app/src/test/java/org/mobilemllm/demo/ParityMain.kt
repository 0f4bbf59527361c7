package org.mobilemllm.demo

import java.io.File
import java.nio.ByteBuffer

/**
 * A JVM entry point for tests/test_apps.py (no Android needed): reads a bundle's manifest.json, a raw
 * RGB file (int32 width, int32 height big-endian, then HWC bytes) and a question, and writes what the
 * app would hand the runner: OUT.chw (the uint8 image, one byte per value) and OUT.json (num_bos, the
 * image's width/height/channels, and the ordered prefill calls).
 *
 *   java -cp app.jar org.mobilemllm.demo.ParityMainKt manifest.json image.rgb "question" OUT
 *   java -cp app.jar org.mobilemllm.demo.ParityMainKt --stats stats.json   (prints the app's numbers)
 *   java -cp app.jar org.mobilemllm.demo.ParityMainKt --open ROOT NAME     (lists bundles, opens one)
 */
fun main(args: Array<String>) {
    if (args.size == 2 && args[0] == "--stats") {  // ExecuTorch stats JSON -> what the app shows
        val st = RunnerStats.parse(File(args[1]).readText(), -1)
        println("{\"decode_tokens_per_s\":${st.decodeTokensPerS},\"prompt_tokens\":${st.promptTokens}," +
            "\"generated_tokens\":${st.generatedTokens},\"model_load_ms\":${st.modelLoadMs}}")
        return
    }
    if (args.size == 3 && args[0] == "--open") {  // what the app shows when the user picks bundle NAME
        val root = File(args[1])
        println("bundles: " + BundleStore.list(root).joinToString(","))
        try {
            val b = BundleStore.open(args[2], root)
            println("ok: ${b.programPath} ${b.tokenizerPath}")
        } catch (e: ManifestError) {
            println("error: ${e.message}")
        }
        return
    }
    require(args.size == 4) { "usage: ParityMain MANIFEST RGB QUESTION OUT | --stats STATS.json | --open ROOT NAME" }
    val manifest = BundleManifest.parse(File(args[0]).readText())
    val raw = File(args[1]).readBytes()
    val head = ByteBuffer.wrap(raw, 0, 8)
    val w = head.int
    val h = head.int
    val rgb = BundleInputs.Rgb(w, h, raw.copyOfRange(8, raw.size))
    val views = BundleInputs.imageViews(rgb, manifest.preprocessing)
    val image = BundleInputs.runnerImage(views)
    File(args[3] + ".chw").writeBytes(ByteArray(image.size) { image[it].toByte() })
    val calls = BundleInputs.promptSegments(manifest, args[2]).joinToString(",") { seg ->
        if (seg.isImage) "[\"image\",null]" else "[\"text\",${quote(seg.text)}]"
    }
    val s = manifest.preprocessing.imageSize
    File(args[3] + ".json").writeText(
        "{\"num_bos\":${BundleInputs.bosTokens(manifest)},\"width\":$s,\"height\":${views.size * s},\"channels\":3," +
            "\"program\":${quote(manifest.programFile)},\"tokenizer_dir\":${quote(manifest.tokenizerDir)}," +
            "\"calls\":[$calls]}"
    )
}

private fun quote(s: String): String {
    val sb = StringBuilder("\"")
    for (ch in s) {
        when {
            ch == '"' -> sb.append("\\\"")
            ch == '\\' -> sb.append("\\\\")
            ch < ' ' -> sb.append(String.format("\\u%04x", ch.code))
            else -> sb.append(ch)
        }
    }
    return sb.append('"').toString()
}
