package org.mobilemllm.demo

/**
 * The LlmModule calls the app makes, with LlmModule's own signatures (RunnerSession.kt hands them to
 * ExecuTorch; tests/test_app_contract.py drives this interface from a JVM and replays every call through
 * ExecuTorch's C++ MultimodalRunner).
 */
interface Llm {
    fun resetContext()
    fun prefillPrompt(prompt: String)
    fun prefillImages(image: IntArray, width: Int, height: Int, channels: Int)
    /** LlmModule.generate(prompt, seqLen, llmCallback, echo): prefill [prompt], then decode until EOS or stop(). */
    fun generate(prompt: String, seqLen: Int, callback: Callback, echo: Boolean)
    fun stop()

    /** LlmCallback: pieces (whole UTF-8 characters: the JNI layer holds back a piece that ends inside one). */
    interface Callback {
        fun onResult(result: String)
        fun onStats(stats: String)
        fun onError(errorCode: Int, message: String)
    }
}

/** The next turn may not fit the model's context: the user starts a new conversation instead. */
class ContextFullError(message: String) : Exception(message)

/** One runner call: "reset", "bos" (num_bos, given to LlmModule's constructor), "text" or "image". */
data class Call(val kind: String, val text: String = "")

/** One answer: its text, how it ended, and what the runner's cache holds after it. */
data class Answer(val text: String, val endedAtEndOfTurn: Boolean, val used: Int, val stats: AnswerStats)

/**
 * Pieces in, the answer out: leading whitespace dropped (the template puts a space before every answer),
 * trailing whitespace held back until more text follows, the end-of-turn piece recognised and not shown.
 */
class AnswerText(private val endOfTurn: String?, private val onText: (String) -> Unit) {
    private val raw = StringBuilder()
    private var shown = ""
    var pieces = 0
        private set
    var endedAtEndOfTurn = false
        private set

    fun add(piece: String) {
        pieces += 1
        var p = piece
        if (endOfTurn != null && p.endsWith(endOfTurn)) {
            p = p.dropLast(endOfTurn.length)
            endedAtEndOfTurn = true
        }
        raw.append(p)
        show(raw.toString().trimStart().trimEnd())
    }

    private fun show(text: String) {
        if (text.length > shown.length && text.startsWith(shown)) {
            onText(text.substring(shown.length))
            shown = text
        }
    }

    val text: String get() = raw.toString().trim()
}

/**
 * One image and the turns about it, on one LlmModule. The same logic as mobilemllm/bundle/app_inputs.py's
 * AppChat (the spec ios_demo's ChatSession.swift follows too):
 *
 * - the first question about an image: resetContext(), then the manifest's prompt segments;
 * - a follow-up after an answer that ended with the end-of-turn token: no reset; the runner's KV cache
 *   holds every answer token but that last one, so the app prefills the end-of-turn text and the next
 *   turn (prompt.follow_up), exactly as training writes a multi-turn conversation;
 * - a follow-up after an answer cut short (Stop, the token limit, an error): the cache lacks the answer's
 *   last token, so the whole conversation is prefilled again from an empty context;
 * - a turn that may not fit the context (a bound: at least one UTF-8 byte per token) is refused with one
 *   clear message before anything runs.
 */
class ChatSession(val manifest: BundleManifest, private val llm: Llm, private val maxNewTokens: Int) {
    private val turns = ArrayList<Pair<String, String>>()
    private var cacheContinues = false
    private var pixels: IntArray? = null
    private var views = 0
    var used = 0
        private set

    /** A new picture: its runner image is made now; the next question starts a new conversation. */
    fun setImage(rgb: BundleInputs.Rgb) {
        val v = BundleInputs.imageViews(rgb, manifest.preprocessing)
        pixels = BundleInputs.runnerImage(v)
        views = v.size
        newChat()
    }

    fun newChat() {
        turns.clear()
        cacheContinues = false
    }

    val hasImage: Boolean get() = pixels != null
    val turnCount: Int get() = turns.size

    /** The calls for [question] after the turns so far (AppChat.calls). */
    fun plan(question: String): List<Call> {
        if (question.isBlank()) throw ManifestError("type a question about the image")
        val fu = manifest.followUp
        val continues = turns.isNotEmpty() && cacheContinues && fu != null
        val calls = if (continues) followUpCalls(question) else listOf(Call("reset")) + conversationCalls(question)
        val start = if (continues) used else 0
        val limit = manifest.maxContextLen
        if (start + tokenBound(calls) + 1 > limit) {
            throw ContextFullError(
                if (turns.isNotEmpty()) "this conversation has filled the model's context ($limit tokens): pick a new image or start a new chat"
                else "the question is too long for the model's context ($limit tokens): shorten it"
            )
        }
        return calls
    }

    private fun followUpCalls(question: String): List<Call> {
        val fu = manifest.followUp ?: throw ManifestError("this bundle's template '${manifest.template}' has no chat turns")
        val q = question.trim()
        return (listOf(fu.endOfTurn) + fu.segments.map { it.replace(BundleInputs.QUESTION, q) })
            .filter { it.isNotEmpty() }.map { Call("text", it) }
    }

    private fun conversationCalls(question: String): List<Call> {
        val questions = turns.map { it.first } + question
        val calls = ArrayList<Call>()
        calls.add(Call("bos", BundleInputs.bosTokens(manifest).toString()))
        for (seg in BundleInputs.promptSegments(manifest, questions[0])) calls.add(if (seg.isImage) Call("image") else Call("text", seg.text))
        for ((i, turn) in turns.withIndex()) {
            val fu = manifest.followUp ?: throw ManifestError("this bundle's template '${manifest.template}' has no chat turns")
            val answer = fu.answer.replace("{answer}", turn.second.trim())
            if (answer.isNotEmpty()) calls.add(Call("text", answer))
            calls.addAll(followUpCalls(questions[i + 1]))
        }
        if (calls.last().kind != "text") throw ManifestError("the prompt must end with a text segment (template '${manifest.template}')")
        return calls
    }

    /** At most how many positions [calls] fill (AppChat's token_bound). */
    fun tokenBound(calls: List<Call>): Int = calls.sumOf { c ->
        when (c.kind) {
            "bos" -> c.text.toInt()
            "image" -> manifest.numVisualTokens
            "text" -> c.text.toByteArray(Charsets.UTF_8).size + 1
            else -> 0
        }
    }

    /**
     * Ask [question] about the current image; pieces of the answer stream to [onText]. Blocks: call it from
     * a background thread. Throws ContextFullError (nothing ran), ManifestError, or the runner's error.
     */
    fun ask(question: String, onText: (String) -> Unit): Answer {
        val image = pixels ?: throw ManifestError("pick or take a picture first")
        val calls = plan(question)
        val start = if (calls.first().kind == "reset") 0 else used
        val t0 = System.nanoTime()
        cacheContinues = false  // unknown until this turn completes
        val s = manifest.preprocessing.imageSize
        for (call in calls.dropLast(1)) {
            when (call.kind) {
                "reset" -> llm.resetContext()
                "image" -> llm.prefillImages(image, s, views * s, 3)
                "text" -> llm.prefillPrompt(call.text)
            }
        }
        val stream = AnswerText(manifest.followUp?.endOfTurn, onText)
        var firstAt = -1L
        var statsJson: String? = null
        var error: String? = null
        llm.generate(calls.last().text, manifest.maxContextLen, object : Llm.Callback {
            override fun onResult(result: String) {
                if (firstAt < 0) firstAt = System.nanoTime()
                stream.add(result)
                if (stream.pieces >= maxNewTokens) llm.stop()
            }

            override fun onStats(stats: String) { statsJson = stats }

            override fun onError(errorCode: Int, message: String) { error = "$message (ExecuTorch error $errorCode)" }
        }, false)
        error?.let { throw IllegalStateException(it) }
        val stats = RunnerStats.parse(statsJson, if (firstAt < 0) -1 else (firstAt - t0) / 1_000_000)
        // The cache holds the prompt and every sampled token but the last: the runner's own count when it
        // reports one, else the bound.
        used = if (stats.promptTokens != null && stats.generatedTokens != null) (stats.promptTokens + stats.generatedTokens).toInt()
        else start + tokenBound(calls) + stream.pieces
        turns.add(question.trim() to stream.text)
        cacheContinues = stream.endedAtEndOfTurn
        return Answer(stream.text, stream.endedAtEndOfTurn, used, stats)
    }
}
