package org.mobilemllm.demo

import android.graphics.Bitmap
import android.graphics.ImageDecoder
import android.net.Uri
import android.os.Bundle
import android.view.View
import android.widget.ArrayAdapter
import android.widget.Button
import android.widget.EditText
import android.widget.ImageView
import android.widget.LinearLayout
import android.widget.ScrollView
import android.widget.Spinner
import android.widget.TextView
import androidx.activity.result.PickVisualMediaRequest
import androidx.activity.result.contract.ActivityResultContracts
import androidx.appcompat.app.AppCompatActivity
import androidx.core.content.FileProvider
import java.io.File
import java.util.Locale
import java.util.concurrent.Executors

/**
 * Pick a bundle, pick or take a picture, ask, and ask again: follow-up questions continue the same
 * conversation (the runner keeps its KV cache); a new picture or *New chat* starts a new one. Answers
 * stream in with time to first token and decode tokens/s. Every failure (no bundle, wrong manifest version,
 * a full context, out of memory, runner error) is shown in the red error line instead of crashing. The UI
 * is built in code to keep the demo small.
 */
class MainActivity : AppCompatActivity() {
    private val worker = Executors.newSingleThreadExecutor()  // model work, one call at a time
    private var runner: RunnerSession? = null
    private var chat: ChatSession? = null
    private var picture: BundleInputs.Rgb? = null
    private var busy = false

    private lateinit var bundles: Spinner
    private lateinit var info: TextView
    private lateinit var preview: ImageView
    private lateinit var question: EditText
    private lateinit var ask: Button
    private lateinit var transcript: TextView
    private lateinit var stats: TextView
    private lateinit var error: TextView

    // The camera app writes the full-resolution photo to this file (TakePicturePreview would give a thumbnail).
    private val photoFile by lazy { File(cacheDir, "photos/photo.jpg").apply { parentFile?.mkdirs() } }
    private val photoUri: Uri by lazy { FileProvider.getUriForFile(this, "$packageName.photos", photoFile) }

    private val pickImage = registerForActivityResult(ActivityResultContracts.PickVisualMedia()) { uri ->
        uri?.let { setImage(it) }
    }
    private val takePhoto = registerForActivityResult(ActivityResultContracts.TakePicture()) { saved ->
        if (saved) setImage(photoUri)
    }

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val pad = (12 * resources.displayMetrics.density).toInt()
        val col = LinearLayout(this).apply { orientation = LinearLayout.VERTICAL; setPadding(pad, pad, pad, pad) }
        bundles = Spinner(this)
        info = TextView(this)
        val pick = Button(this).apply { text = "Pick image"; setOnClickListener { pickImage.launch(PickVisualMediaRequest(ActivityResultContracts.PickVisualMedia.ImageOnly)) } }
        val photo = Button(this).apply { text = "Take photo"; setOnClickListener { takePhoto.launch(photoUri) } }
        val newChat = Button(this).apply { text = "New chat"; setOnClickListener { onNewChat() } }
        val row = LinearLayout(this).apply { addView(pick); addView(photo); addView(newChat) }
        preview = ImageView(this).apply { adjustViewBounds = true; maxHeight = (240 * resources.displayMetrics.density).toInt() }
        transcript = TextView(this).apply { textSize = 17f; setTextIsSelectable(true) }
        question = EditText(this).apply { hint = "Ask about the image"; setSingleLine() }
        ask = Button(this).apply { text = "Ask"; setOnClickListener { onAsk() } }
        stats = TextView(this)
        error = TextView(this).apply { setTextColor(0xFFB42318.toInt()); visibility = View.GONE }
        listOf(bundles, info, row, preview, transcript, question, ask, stats, error).forEach { col.addView(it) }
        setContentView(ScrollView(this).apply { addView(col) })
        refreshBundles()
    }

    override fun onDestroy() {
        runner?.stop()
        worker.execute { runner?.close(); runner = null; chat = null }
        worker.shutdown()
        super.onDestroy()
    }

    private fun showError(message: String?) {
        error.text = message ?: ""
        error.visibility = if (message == null) View.GONE else View.VISIBLE
    }

    private fun refreshBundles() {
        val names = BundleStore.list()
        if (names.isEmpty()) {
            showError("No bundles in ${BundleStore.ROOT}. Export one and push it from your computer:\n" +
                "mobilemllm export --target android --model CKPT --out tiny-android\n" +
                "mobilemllm push --bundle tiny-android --target android")
            return
        }
        bundles.adapter = ArrayAdapter(this, android.R.layout.simple_spinner_dropdown_item, names)
        bundles.onItemSelectedListener = object : android.widget.AdapterView.OnItemSelectedListener {
            override fun onItemSelected(p: android.widget.AdapterView<*>?, v: View?, pos: Int, id: Long) = openBundle(names[pos])
            override fun onNothingSelected(p: android.widget.AdapterView<*>?) {}
        }
    }

    private fun openBundle(name: String) {
        showError(null)
        info.text = "loading $name…"
        ask.isEnabled = false
        worker.execute {
            val old = runner
            runner = null
            chat = null
            old?.close()
            val result = runCatching {
                val r = RunnerSession(BundleStore.open(name), 0f).also { it.load() }
                r to ChatSession(r.bundle.manifest, r, MAX_NEW_TOKENS).also { c -> picture?.let { c.setImage(it) } }
            }
            runOnUiThread {
                result.onSuccess { (r, c) ->
                    runner = r
                    chat = c
                    transcript.text = ""
                    val m = r.bundle.manifest
                    info.text = "${m.modelName} · ${m.target} · ${m.preprocessing.imageSize}px → ${m.numVisualTokens} " +
                        "visual tokens · ${m.maxContextLen}-token context · ${m.quantization.values.distinct().joinToString("/")}" +
                        if (!m.parityPassed) " · parity FAILED at export" else ""
                    ask.isEnabled = true
                }.onFailure { showError(describe(it, "cannot load $name")); info.text = "" }
            }
        }
    }

    /** Decoded at a power-of-two fraction of its size, as large as the bundle's preprocessing can use. */
    private fun decode(uri: Uri, pre: Preprocessing?): Bitmap =
        ImageDecoder.decodeBitmap(ImageDecoder.createSource(contentResolver, uri)) { decoder, info, _ ->
            decoder.allocator = ImageDecoder.ALLOCATOR_SOFTWARE  // getPixels needs a software bitmap
            decoder.setTargetSampleSize(BundleInputs.sampleSize(info.size.width, info.size.height, pre))
        }

    private fun setImage(uri: Uri) {
        showError(null)
        val pre = chat?.manifest?.preprocessing
        worker.execute {
            val result = runCatching {
                val bmp = decode(uri, pre).copy(Bitmap.Config.ARGB_8888, false)
                val rgb = toRgb(bmp)
                chat?.setImage(rgb)  // a new picture starts a new conversation
                bmp to rgb
            }
            runOnUiThread {
                result.onSuccess { (bmp, rgb) -> picture = rgb; preview.setImageBitmap(bmp); transcript.text = "" }
                    .onFailure { showError(describe(it, "cannot read that image")) }
            }
        }
    }

    private fun onNewChat() {
        if (busy) return
        showError(null)
        transcript.text = ""
        stats.text = ""
        worker.execute { chat?.newChat() }
    }

    private fun onAsk() {
        val c = chat ?: return showError("pick a bundle first")
        if (busy) { runner?.stop(); return }
        if (picture == null) return showError("pick or take a picture first")
        val q = question.text.toString()
        if (q.isBlank()) return showError("type a question about the image")
        showError(null)
        busy = true
        ask.text = "Stop"
        stats.text = ""
        question.setText("")
        transcript.append((if (transcript.text.isEmpty()) "" else "\n\n") + "You: ${q.trim()}\nModel: ")
        worker.execute {
            val result = runCatching { c.ask(q) { piece -> runOnUiThread { transcript.append(piece) } } }
            runOnUiThread {
                busy = false
                ask.text = "Ask"
                result.onSuccess { a ->
                    val st = a.stats
                    stats.text = String.format(Locale.US, "time to first token %d ms · decode %s tok/s · %d of %d context tokens used",
                        st.ttftMs, st.decodeTokensPerS?.let { String.format(Locale.US, "%.1f", it) } ?: "–",
                        a.used, c.manifest.maxContextLen)
                }.onFailure { showError(describe(it, "generation failed")) }
            }
        }
    }

    companion object {
        const val MAX_NEW_TOKENS = 128

        /** Decoded pixels -> RGB bytes; alpha is dropped, as Pillow's convert("RGB") does. */
        fun toRgb(bmp: Bitmap): BundleInputs.Rgb {
            val w = bmp.width
            val h = bmp.height
            val argb = IntArray(w * h)
            bmp.getPixels(argb, 0, w, 0, 0, w, h)
            val out = ByteArray(w * h * 3)
            for (i in argb.indices) {
                out[i * 3] = (argb[i] shr 16).toByte()
                out[i * 3 + 1] = (argb[i] shr 8).toByte()
                out[i * 3 + 2] = argb[i].toByte()
            }
            return BundleInputs.Rgb(w, h, out)
        }

        fun describe(e: Throwable, what: String): String = when (e) {
            is ManifestError, is ContextFullError -> e.message ?: what
            is OutOfMemoryError -> "$what: not enough memory on this phone for this model (try a smaller or " +
                "int4-quantized bundle, or close other apps)"
            else -> "$what: ${e.message ?: e.javaClass.simpleName}"
        }
    }
}
