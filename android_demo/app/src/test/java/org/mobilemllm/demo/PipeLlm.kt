package org.mobilemllm.demo

import org.json.JSONArray
import org.json.JSONObject
import java.io.BufferedReader
import java.io.File
import java.io.PrintStream

/**
 * A stand-in for LlmModule on a JVM (tests/test_app_contract.py): every call the app makes, with its exact
 * arguments, goes out as one JSON line on stdout; the test runs it on ExecuTorch's C++ MultimodalRunner
 * with LlmModule's rules and answers on stdin (pieces, stats, errors, and whether stop() was called).
 * Images are written to [dir] as raw bytes (IntArray values 0..255, one byte each).
 */
class PipeLlm(
    modelType: Int, modulePath: String, tokenizerPath: String, temperature: Float, dataFiles: List<String>,
    numBos: Int, numEos: Int, private val input: BufferedReader, private val out: PrintStream, private val dir: File,
) : Llm {
    private var stopped = false
    private var images = 0

    init {
        // LlmModule(modelType, modulePath, tokenizerPath, temperature, dataFiles, numBos, numEos)
        send(JSONObject().put("call", "LlmModule").put("modelType", modelType).put("modulePath", modulePath)
            .put("tokenizerPath", tokenizerPath).put("temperature", temperature.toDouble())
            .put("dataFiles", JSONArray(dataFiles)).put("numBos", numBos).put("numEos", numEos))
        reply().optString("error", "").takeIf { it.isNotEmpty() }?.let { throw IllegalArgumentException(it) }
    }

    private fun send(o: JSONObject) { out.println(o.toString()); out.flush() }

    private fun reply(): JSONObject = JSONObject(input.readLine() ?: throw IllegalStateException("the test closed stdin"))

    private fun simple(o: JSONObject) {
        send(o)
        val r = reply()
        if (r.has("error")) throw IllegalStateException(r.getString("error"))
    }

    override fun resetContext() = simple(JSONObject().put("call", "resetContext"))

    override fun prefillPrompt(prompt: String) = simple(JSONObject().put("call", "prefillPrompt").put("prompt", prompt))

    override fun prefillImages(image: IntArray, width: Int, height: Int, channels: Int) {
        val f = File(dir, "image${images++}.u8")
        f.writeBytes(ByteArray(image.size) { image[it].toByte() })
        simple(JSONObject().put("call", "prefillImages").put("file", f.path).put("length", image.size)
            .put("width", width).put("height", height).put("channels", channels))
    }

    override fun generate(prompt: String, seqLen: Int, callback: Llm.Callback, echo: Boolean) {
        send(JSONObject().put("call", "generate").put("prompt", prompt).put("seqLen", seqLen).put("echo", echo))
        while (true) {
            val r = reply()
            when {
                r.has("piece") -> {
                    stopped = false
                    callback.onResult(r.getString("piece"))
                    send(JSONObject().put("stop", stopped))
                }
                r.has("stats") -> callback.onStats(r.getString("stats"))
                r.has("error") -> {
                    callback.onError(r.getInt("code"), r.getString("error"))
                    throw IllegalStateException("Failed to generate")  // LlmModule throws after onError
                }
                r.has("done") -> return
            }
        }
    }

    override fun stop() { stopped = true }
}
