package org.mobilemllm.demo

import org.json.JSONArray
import org.json.JSONException
import org.json.JSONObject

// =====================================================================================================
// Manifest.kt: the ONLY file that reads manifest.json fields. Every read is a full dotted path from the
// manifest root ("prompt.segments[].text"; "[]" = each array item, "*" = each map value) passed to
// Node.req/Node.opt. tests/test_apps.py extracts these paths and checks each one exists in
// mobilemllm/schemas/manifest.schema.json, so the app and the exporter cannot drift apart silently.
// =====================================================================================================

/** The manifest version this app reads; a bundle with another one is refused with a clear message. */
const val SUPPORTED_SCHEMA_VERSION = 1L

class ManifestError(message: String) : Exception(message)

/**
 * A JSON value (org.json's: JSONObject, JSONArray, String, Number, Boolean; JSONObject.NULL is absent) plus
 * its schema path, so each read can be checked against where it is made.
 */
class Node(val value: Any?, val path: String) {
    private fun child(fullPath: String): Any? {
        val prefix = if (path.isEmpty()) "" else "$path."
        require(fullPath.startsWith(prefix) && '.' !in fullPath.substring(prefix.length)) {
            "manifest read '$fullPath' made on node '$path'"  // a programming error, caught by the JVM test
        }
        val obj = value as? JSONObject ?: throw ManifestError("manifest: '$path' is not an object")
        return obj.opt(fullPath.substring(prefix.length)).takeUnless { it == JSONObject.NULL }
    }

    fun req(fullPath: String): Node =
        child(fullPath)?.let { Node(it, fullPath) } ?: throw ManifestError("manifest.json has no '$fullPath'")

    fun opt(fullPath: String): Node? = child(fullPath)?.let { Node(it, fullPath) }

    fun str(): String = value as? String ?: throw ManifestError("manifest: '$path' is not a string")
    fun bool(): Boolean = value as? Boolean ?: throw ManifestError("manifest: '$path' is not true/false")
    fun long(): Long = when (val v = value) {
        is Int -> v.toLong()
        is Long -> v
        is Number -> v.toDouble().let { d ->
            if (d == Math.floor(d) && !d.isInfinite()) d.toLong() else throw ManifestError("manifest: '$path' is not an integer")
        }
        else -> throw ManifestError("manifest: '$path' is not a number")
    }
    fun int(): Int = long().toInt()
    fun double(): Double = (value as? Number)?.toDouble() ?: throw ManifestError("manifest: '$path' is not a number")
    fun items(): List<Node> {
        val a = value as? JSONArray ?: throw ManifestError("manifest: '$path' is not a list")
        return (0 until a.length()).map { Node(a.opt(it).takeUnless { v -> v == JSONObject.NULL }, "$path[]") }
    }
    fun entries(): List<Pair<String, Node>> {
        val o = value as? JSONObject ?: throw ManifestError("manifest: '$path' is not an object")
        return o.keys().asSequence().toList().sorted().map { k -> k to Node(o.opt(k), "$path.*") }
    }
}

data class Segment(val isImage: Boolean, val text: String)

/** prompt.follow_up: how a later turn continues the conversation (training's multi-turn layout). */
data class FollowUp(
    val answer: String,          // an earlier answer when the conversation is prefilled again ("{answer}")
    val endOfTurn: String,       // the end-of-turn token's text: it ends every answer in the cache
    val segments: List<String>,  // the next turn's text, "{question}" filled in
)

data class Preprocessing(
    val imageSize: Int,
    val aspect: String,          // "pad" | "resize"
    val padColor: IntArray?,     // RGB, required for "pad"
    val resample: String,        // "bicubic" (Pillow's, reproduced exactly by BundleInputs)
    val hires: String,           // "direct" | "tiles"
    val tileGrid: IntArray,      // rows, cols
    val views: Int,
    val inputDtype: String,      // "uint8": the program normalises inside
    val inputShape: List<Long>,  // the vision_encoder input, e.g. [1, 3, V*S, S]
    val normalizeInGraph: Boolean,
)

data class BundleManifest(
    val schemaVersion: Long,
    val format: String,
    val target: String,
    val modelName: String,
    val programFile: String,
    val fileSizes: Map<String, Long>,
    val tokenizerDir: String,
    val tokenizerFile: String,   // what LlmModule loads: a readable file (it refuses folders)
    val bosId: Long?,
    val eosIds: List<Long>,
    val template: String,
    val addBos: Boolean,
    val bosInFirstText: Boolean,
    val segments: List<Segment>,
    val numVisualTokens: Int,
    val followUp: FollowUp?,     // null: the template has no chat turns (each question is a new conversation)
    val preprocessing: Preprocessing,
    val maxSeqLen: Int,
    val maxContextLen: Int,
    val quantization: Map<String, String>,
    val parityPassed: Boolean,
    val parityForced: Boolean,
) {
    companion object {
        fun parse(text: String): BundleManifest {
            val root = try {
                Node(JSONObject(text), "")
            } catch (e: JSONException) {
                throw ManifestError("manifest.json is not valid JSON: ${e.message}")
            }
            val version = root.req("schema_version").long()
            if (version != SUPPORTED_SCHEMA_VERSION) {
                throw ManifestError("this bundle's manifest is version $version; this app reads version " +
                    "$SUPPORTED_SCHEMA_VERSION. Re-export it with the mobilemllm that matches this app, or update the app")
            }
            val format = root.req("format").str()
            if (format != "executorch") {
                throw ManifestError("this is a '$format' bundle; the Android demo runs ExecuTorch bundles " +
                    "(mobilemllm export --target android)")
            }
            val files = root.req("files").entries()
            val program = files.firstOrNull { (_, f) -> f.opt("files.*.role")?.str() == "program" }?.first
                ?: throw ManifestError("manifest.json lists no program file (files.*.role = program)")
            val tok = root.req("tokenizer")
            val prompt = root.req("prompt")
            val pre = root.req("preprocessing")
            val ctx = root.req("context")
            val parity = root.req("parity")
            return BundleManifest(
                schemaVersion = version,
                format = format,
                target = root.req("target").str(),
                modelName = root.req("model").req("model.name").str(),
                programFile = program,
                fileSizes = files.associate { (name, f) -> name to f.req("files.*.size").long() },
                tokenizerDir = tok.req("tokenizer.dir").str(),
                tokenizerFile = files.firstOrNull { (name, f) ->
                    f.opt("files.*.role")?.str() == "tokenizer" && name.endsWith("/tokenizer.json")
                }?.first ?: throw ManifestError("manifest.json lists no tokenizer.json (files.*.role = tokenizer)"),
                bosId = tok.opt("tokenizer.bos_id")?.long(),
                eosIds = tok.req("tokenizer.eos_ids").items().map { it.long() },
                template = prompt.req("prompt.template").str(),
                addBos = prompt.req("prompt.add_bos").bool(),
                bosInFirstText = prompt.opt("prompt.bos_in_first_text")?.bool() ?: false,
                segments = prompt.req("prompt.segments").items().map { seg ->
                    when (val type = seg.req("prompt.segments[].type").str()) {
                        "image" -> Segment(true, "")
                        "text" -> Segment(false, seg.req("prompt.segments[].text").str())
                        else -> throw ManifestError("manifest prompt segment type '$type' is not text or image")
                    }
                },
                numVisualTokens = prompt.req("prompt.num_visual_tokens").int(),
                followUp = prompt.opt("prompt.follow_up")?.let { fu ->
                    FollowUp(
                        answer = fu.req("prompt.follow_up.answer").str(),
                        endOfTurn = fu.req("prompt.follow_up.end_of_turn").str(),
                        segments = fu.req("prompt.follow_up.segments").items().map { it.req("prompt.follow_up.segments[].text").str() },
                    )
                },
                preprocessing = Preprocessing(
                    imageSize = pre.req("preprocessing.image_size").int(),
                    aspect = pre.req("preprocessing.aspect").str(),
                    padColor = pre.opt("preprocessing.pad_color")?.items()?.map { it.int() }?.toIntArray(),
                    resample = pre.req("preprocessing.resample").str(),
                    hires = pre.opt("preprocessing.hires")?.str() ?: "direct",
                    tileGrid = pre.opt("preprocessing.tile_grid")?.items()?.map { it.int() }?.toIntArray() ?: intArrayOf(1, 1),
                    views = pre.opt("preprocessing.views")?.int() ?: 1,
                    inputDtype = pre.req("preprocessing.input_dtype").str(),
                    inputShape = pre.req("preprocessing.input_shape").items().map { it.long() },
                    normalizeInGraph = pre.req("preprocessing.normalize_in_graph").bool(),
                ),
                maxSeqLen = ctx.req("context.max_seq_len").int(),
                maxContextLen = ctx.req("context.max_context_len").int(),
                quantization = root.req("quantization").entries()
                    .associate { (part, q) -> part to q.req("quantization.*.scheme").str() },
                parityPassed = parity.req("parity.passed").bool(),
                parityForced = parity.req("parity.forced").bool(),
            ).also { it.check() }
        }
    }

    /** What the app can run: refuse anything its preprocessing or the runner cannot do, before loading. */
    fun check() {
        val p = preprocessing
        if (p.resample != "bicubic") throw ManifestError("preprocessing.resample '${p.resample}' is not implemented (bicubic is)")
        if (p.aspect != "pad" && p.aspect != "resize") throw ManifestError("preprocessing.aspect '${p.aspect}' is unknown")
        if (p.aspect == "pad" && (p.padColor == null || p.padColor.size != 3)) throw ManifestError("preprocessing.pad_color is missing")
        if (p.hires != "direct" && p.hires != "tiles") throw ManifestError("preprocessing.hires '${p.hires}' is unknown")
        if (p.inputDtype != "uint8" || !p.normalizeInGraph) {
            throw ManifestError("this app passes uint8 RGB; the bundle wants ${p.inputDtype} (normalize_in_graph=${p.normalizeInGraph})")
        }
        val s = p.imageSize.toLong()
        if (p.inputShape.size != 4 || p.inputShape[1] != 3L || p.inputShape[2] != p.views * s || p.inputShape[3] != s) {
            throw ManifestError("vision input shape ${p.inputShape} is not [1, 3, views*${s}, $s]")
        }
        if (segments.isEmpty() || segments.last().isImage) {
            throw ManifestError("the prompt must end with a text segment (template '$template')")
        }
    }
}
