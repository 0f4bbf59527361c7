package org.mobilemllm.demo

import android.os.SystemClock
import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule

/**
 * One loaded bundle: ExecuTorch's LlmModule in its multimodal model type (the C++ MultimodalRunner that
 * `mobilemllm generate --bundle` also drives). Each question starts from an empty context.
 * Call from a background thread: every method blocks.
 */
class RunnerSession(val bundle: BundleStore.Bundle, temperature: Float) : AutoCloseable {
    private val module = LlmModule(
        LlmModule.MODEL_TYPE_MULTIMODAL,
        bundle.programPath,
        bundle.tokenizerPath,
        temperature,
        emptyList<String>(),
        BundleInputs.bosTokens(bundle.manifest),  // num_bos: 0 when "<s>" is already in the first text
        0,
    )

    fun load() = module.load()

    fun stop() = module.stop()

    /**
     * Prefill the manifest's segments in order (text, image, ...), generate after the last text segment,
     * and stream pieces to [onText]. Stops after [maxNewTokens] pieces or at EOS.
     */
    fun answer(image: BundleInputs.Rgb, question: String, maxNewTokens: Int, onText: (String) -> Unit): AnswerStats {
        val m = bundle.manifest
        val views = BundleInputs.imageViews(image, m.preprocessing)
        val pixels = BundleInputs.runnerImage(views)
        val s = m.preprocessing.imageSize
        val segments = BundleInputs.promptSegments(m, question)
        module.resetContext()
        val t0 = SystemClock.elapsedRealtime()
        for (seg in segments.dropLast(1)) {
            if (seg.isImage) module.prefillImages(pixels, s, views.size * s, 3) else module.prefillPrompt(seg.text)
        }
        var firstAt = -1L
        var pieces = 0
        var statsJson: String? = null
        var error: String? = null
        val callback = object : LlmCallback {
            override fun onResult(result: String) {
                if (firstAt < 0) firstAt = SystemClock.elapsedRealtime()
                onText(result)
                pieces += 1
                if (pieces >= maxNewTokens) module.stop()
            }

            override fun onStats(stats: String) { statsJson = stats }

            override fun onError(errorCode: Int, message: String) { error = "$message (ExecuTorch error $errorCode)" }
        }
        // The last segment is text (Manifest.check makes sure): generate() prefills it, then decodes.
        module.generate(segments.last().text, m.maxContextLen, callback, false)
        error?.let { throw IllegalStateException(it) }
        return RunnerStats.parse(statsJson, if (firstAt < 0) -1 else firstAt - t0)
    }

    override fun close() = module.close()
}
