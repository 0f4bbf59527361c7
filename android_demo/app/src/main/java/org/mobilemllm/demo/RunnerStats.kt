package org.mobilemllm.demo

import org.json.JSONObject

/** The numbers the app shows after an answer. */
data class AnswerStats(
    val ttftMs: Long,                // app clock: first prefill call -> first streamed piece (image + prompt)
    val decodeTokensPerS: Double?,   // runner stats: generated_tokens / (inference_end - prompt_eval_end)
    val promptTokens: Long?,
    val generatedTokens: Long?,
    val modelLoadMs: Long?,
)

/**
 * ExecuTorch's stats JSON (LlmCallback.onStats; extension/llm/runner/stats.h) -> what the app shows, with
 * the same definitions as mobilemllm/runtime/metrics.py (tests/test_apps.py checks them against it).
 * Pure Kotlin, so the JVM test can run it.
 */
object RunnerStats {
    fun parse(json: String?, ttftMs: Long): AnswerStats {
        val s = json?.let { runCatching { JSONObject(it) }.getOrNull() } ?: JSONObject()
        fun num(key: String): Double? = (s.opt(key) as? Number)?.toDouble()
        val scale = num("SCALING_FACTOR_UNITS_PER_SECOND") ?: 1000.0
        val generated = num("generated_tokens")
        val decodeUnits = (num("inference_end_ms") ?: 0.0) - (num("prompt_eval_end_ms") ?: 0.0)
        val load = num("model_load_end_ms")?.let { end -> num("model_load_start_ms")?.let { end - it } }
        return AnswerStats(
            ttftMs = ttftMs,
            decodeTokensPerS = if (generated != null && decodeUnits > 0) generated / decodeUnits * scale else null,
            promptTokens = num("prompt_tokens")?.toLong(),
            generatedTokens = generated?.toLong(),
            modelLoadMs = load?.toLong(),
        )
    }
}
