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
 *   java -cp app.jar org.mobilemllm.demo.ParityMainKt --chat ROOT WORKDIR  (ChatSession over PipeLlm)
 *   java -cp app.jar org.mobilemllm.demo.ParityMainKt --pieces PIECES.json END_OF_TURN  (AnswerText)
 *   java -cp app.jar org.mobilemllm.demo.ParityMainKt --sample-size MANIFEST W H     (photo decoding)
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
    if (args.size == 3 && args[0] == "--pieces") {  // AnswerText over a JSON list of pieces; END_OF_TURN text
        val shown = org.json.JSONArray()
        val a = AnswerText(args[2]) { shown.put(it) }
        val pieces = org.json.JSONArray(File(args[1]).readText(Charsets.UTF_8))
        for (i in 0 until pieces.length()) a.add(pieces.getString(i))
        println(org.json.JSONObject().put("text", a.text).put("shown", shown).put("endedAtEndOfTurn", a.endedAtEndOfTurn)
            .put("pieces", a.pieces).toString())
        return
    }
    if (args.size == 4 && args[0] == "--sample-size") {  // the decoder's down-sampling for a W x H picture
        val pre = BundleManifest.parse(File(args[1]).readText()).preprocessing
        println(BundleInputs.sampleSize(args[2].toInt(), args[3].toInt(), pre))
        return
    }
    if (args.size == 3 && args[0] == "--chat") {  // the app's conversation logic on a stand-in LlmModule
        chat(File(args[1]), File(args[2]))
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

/**
 * Commands on stdin, one JSON object a line: {"open": NAME} opens ROOT/NAME as MainActivity does
 * (BundleStore.open, then RunnerSession's LlmModule arguments); {"image": RGB_FILE}; {"ask": Q,
 * "max_new_tokens": N}; {"new_chat": true}. PipeLlm's calls and this function's results
 * ({"event": "answer" | "error" | "plan", ...}) go to stdout.
 */
fun chat(root: File, work: File) {
    val input = System.`in`.bufferedReader()
    val out = System.out
    var session: ChatSession? = null
    var llm: PipeLlm? = null
    var picture: BundleInputs.Rgb? = null
    fun event(o: org.json.JSONObject) { out.println(o.put("event", o.optString("event")).toString()); out.flush() }
    while (true) {
        val line = input.readLine() ?: return
        val cmd = org.json.JSONObject(line)
        try {
            when {
                cmd.has("open") -> {
                    val b = BundleStore.open(cmd.getString("open"), root)
                    llm = PipeLlm(2, b.programPath, b.tokenizerPath, 0f, emptyList(), BundleInputs.bosTokens(b.manifest), 0,
                        input, out, work)  // the arguments RunnerSession gives LlmModule (MODEL_TYPE_MULTIMODAL = 2)
                    session = ChatSession(b.manifest, llm, cmd.getInt("max_new_tokens"))
                    picture?.let { session.setImage(it) }
                    event(org.json.JSONObject().put("event", "opened"))
                }
                cmd.has("image") -> {
                    val raw = File(cmd.getString("image")).readBytes()
                    val head = ByteBuffer.wrap(raw, 0, 8)
                    picture = BundleInputs.Rgb(head.int, head.int, raw.copyOfRange(8, raw.size))
                    picture?.let { session?.setImage(it) }
                    event(org.json.JSONObject().put("event", "image"))
                }
                cmd.has("new_chat") -> { session!!.newChat(); event(org.json.JSONObject().put("event", "new_chat")) }
                cmd.has("ask") -> {
                    val s = session!!
                    val plan = s.plan(cmd.getString("ask"))
                    event(org.json.JSONObject().put("event", "plan").put("calls", org.json.JSONArray(plan.map { org.json.JSONArray(listOf(it.kind, it.text)) })))
                    val shown = StringBuilder()
                    val a = s.ask(cmd.getString("ask")) { shown.append(it) }
                    event(org.json.JSONObject().put("event", "answer").put("text", a.text).put("shown", shown.toString())
                        .put("endedAtEndOfTurn", a.endedAtEndOfTurn).put("used", a.used))
                }
            }
        } catch (e: Exception) {
            event(org.json.JSONObject().put("event", "error").put("kind", e.javaClass.simpleName).put("message", e.message ?: ""))
        }
    }
}
