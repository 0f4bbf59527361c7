package org.mobilemllm.demo

import org.pytorch.executorch.extension.llm.LlmCallback
import org.pytorch.executorch.extension.llm.LlmModule

/**
 * One loaded bundle: ExecuTorch's LlmModule in its multimodal model type (the C++ MultimodalRunner that
 * `mobilemllm generate --bundle` also drives), behind the [Llm] calls ChatSession makes. The KV cache
 * stays between calls until resetContext(), which is what lets a follow-up continue the conversation.
 * Call from a background thread: every method but stop() blocks.
 */
class RunnerSession(val bundle: BundleStore.Bundle, temperature: Float) : Llm, AutoCloseable {
    private val module = LlmModule(
        LlmModule.MODEL_TYPE_MULTIMODAL,
        bundle.programPath,
        bundle.tokenizerPath,  // tokenizer.json: LlmModule refuses a folder
        temperature,
        emptyList<String>(),
        BundleInputs.bosTokens(bundle.manifest),  // num_bos: 0 when "<s>" is already in the first text
        0,
    )

    fun load() = module.load()

    override fun resetContext() = module.resetContext()

    override fun prefillPrompt(prompt: String) = module.prefillPrompt(prompt)

    override fun prefillImages(image: IntArray, width: Int, height: Int, channels: Int) =
        module.prefillImages(image, width, height, channels)

    override fun generate(prompt: String, seqLen: Int, callback: Llm.Callback, echo: Boolean) =
        module.generate(prompt, seqLen, object : LlmCallback {
            override fun onResult(result: String) = callback.onResult(result)
            override fun onStats(stats: String) = callback.onStats(stats)
            override fun onError(errorCode: Int, message: String) = callback.onError(errorCode, message)
        }, echo)

    override fun stop() = module.stop()

    override fun close() = module.close()
}
