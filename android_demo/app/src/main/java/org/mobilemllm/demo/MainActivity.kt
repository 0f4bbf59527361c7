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
import java.util.Locale
import java.util.concurrent.Executors

/**
 * Pick a bundle, pick or take a picture, ask; the answer streams in with time to first token and
 * decode tokens/s. Every failure (no bundle, wrong manifest version, out of memory, runner error) is
 * shown in the red error line instead of crashing. The UI is built in code to keep the demo small.
 */
class MainActivity : AppCompatActivity() {
    private val worker = Executors.newSingleThreadExecutor()  // model work, one call at a time
    private var session: RunnerSession? = null
    private var image: BundleInputs.Rgb? = null
    private var busy = false

    private lateinit var bundles: Spinner
    private lateinit var info: TextView
    private lateinit var preview: ImageView
    private lateinit var question: EditText
    private lateinit var ask: Button
    private lateinit var answer: TextView
    private lateinit var stats: TextView
    private lateinit var error: TextView

    private val pickImage = registerForActivityResult(ActivityResultContracts.PickVisualMedia()) { uri ->
        uri?.let { setImage { decode(it) } }
    }
    private val takePhoto = registerForActivityResult(ActivityResultContracts.TakePicturePreview()) { bmp ->
        bmp?.let { setImage { it } }
    }

    override fun onCreate(savedInstanceState: Bundle?) {
        super.onCreate(savedInstanceState)
        val pad = (12 * resources.displayMetrics.density).toInt()
        val col = LinearLayout(this).apply { orientation = LinearLayout.VERTICAL; setPadding(pad, pad, pad, pad) }
        bundles = Spinner(this)
        info = TextView(this)
        val pick = Button(this).apply { text = "Pick image"; setOnClickListener { pickImage.launch(PickVisualMediaRequest(ActivityResultContracts.PickVisualMedia.ImageOnly)) } }
        val photo = Button(this).apply { text = "Take photo"; setOnClickListener { takePhoto.launch(null) } }
        val row = LinearLayout(this).apply { addView(pick); addView(photo) }
        preview = ImageView(this).apply { adjustViewBounds = true; maxHeight = (240 * resources.displayMetrics.density).toInt() }
        question = EditText(this).apply { hint = "Ask about the image"; setSingleLine() }
        ask = Button(this).apply { text = "Ask"; setOnClickListener { onAsk() } }
        answer = TextView(this).apply { textSize = 17f; setTextIsSelectable(true) }
        stats = TextView(this)
        error = TextView(this).apply { setTextColor(0xFFB42318.toInt()); visibility = View.GONE }
        listOf(bundles, info, row, preview, question, ask, answer, stats, error).forEach { col.addView(it) }
        setContentView(ScrollView(this).apply { addView(col) })
        refreshBundles()
    }

    override fun onDestroy() {
        session?.stop()
        worker.execute { session?.close(); session = null }
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
            val old = session
            session = null
            old?.close()
            val result = runCatching {
                val bundle = BundleStore.open(name)
                RunnerSession(bundle, 0f).also { it.load() }
            }
            runOnUiThread {
                result.onSuccess { s ->
                    session = s
                    val m = s.bundle.manifest
                    info.text = "${m.modelName} · ${m.target} · ${m.preprocessing.imageSize}px → ${m.numVisualTokens} " +
                        "visual tokens · ${m.quantization.values.distinct().joinToString("/")}" +
                        if (!m.parityPassed) " · parity FAILED at export" else ""
                    ask.isEnabled = true
                }.onFailure { showError(describe(it, "cannot load $name")); info.text = "" }
            }
        }
    }

    private fun decode(uri: Uri): Bitmap =
        ImageDecoder.decodeBitmap(ImageDecoder.createSource(contentResolver, uri)) { decoder, _, _ ->
            decoder.allocator = ImageDecoder.ALLOCATOR_SOFTWARE  // getPixels needs a software bitmap
        }

    private fun setImage(load: () -> Bitmap) {
        showError(null)
        worker.execute {
            val result = runCatching {
                val bmp = load().copy(Bitmap.Config.ARGB_8888, false)
                bmp to toRgb(bmp)
            }
            runOnUiThread {
                result.onSuccess { (bmp, rgb) -> image = rgb; preview.setImageBitmap(bmp) }
                    .onFailure { showError(describe(it, "cannot read that image")) }
            }
        }
    }

    private fun onAsk() {
        val s = session ?: return showError("pick a bundle first")
        val img = image ?: return showError("pick or take a picture first")
        val q = question.text.toString()
        if (q.isBlank()) return showError("type a question about the image")
        if (busy) { s.stop(); return }
        showError(null)
        busy = true
        ask.text = "Stop"
        answer.text = ""
        stats.text = ""
        worker.execute {
            val result = runCatching { s.answer(img, q, MAX_NEW_TOKENS) { piece -> runOnUiThread { answer.append(piece) } } }
            runOnUiThread {
                busy = false
                ask.text = "Ask"
                result.onSuccess { st ->
                    stats.text = String.format(Locale.US, "time to first token %d ms · decode %s tok/s · %s prompt + %s generated tokens",
                        st.ttftMs, st.decodeTokensPerS?.let { String.format(Locale.US, "%.1f", it) } ?: "–",
                        st.promptTokens ?: "?", st.generatedTokens ?: "?")
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
            is ManifestError -> e.message ?: what
            is OutOfMemoryError -> "$what: not enough memory on this phone for this model (try a smaller or " +
                "int4-quantized bundle, or close other apps)"
            else -> "$what: ${e.message ?: e.javaClass.simpleName}"
        }
    }
}
