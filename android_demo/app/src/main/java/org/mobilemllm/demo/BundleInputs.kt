package org.mobilemllm.demo

/**
 * What the app does before calling the runner, as the manifest says: a line-by-line port of
 * mobilemllm/bundle/app_inputs.py (tests/test_apps.py compiles this file on a JVM and checks its bytes and
 * prompt against Python's). Pure Kotlin, no Android types: MainActivity turns a Bitmap into [Rgb].
 *
 * The resize reproduces Pillow 13's bicubic filter exactly (training preprocessed with Pillow):
 * coefficients in double, normalised, turned into 22-bit fixed point, accumulated in Int with
 * rounding, clamped to 0..255; two passes, vertical first when the height shrinks by more than
 * twice as many pixels as the width does.
 */
object BundleInputs {
    const val PRECISION_BITS = 22
    const val QUESTION = "{question}"

    /** Decoded RGB pixels, row-major HWC, 0..255 stored in bytes. */
    class Rgb(val width: Int, val height: Int, val data: ByteArray) {
        init { require(data.size == width * height * 3) { "RGB buffer is ${data.size} bytes, expected ${width * height * 3}" } }
        fun at(y: Int, x: Int, c: Int): Int = data[(y * width + x) * 3 + c].toInt() and 0xFF
    }

    fun bicubic(x0: Double): Double {
        val a = -0.5
        val x = Math.abs(x0)
        if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
        if (x < 2.0) return (((x - 5.0) * x + 8.0) * x - 4.0) * a
        return 0.0
    }

    class Coefficients(val starts: IntArray, val weights: Array<IntArray>)

    fun coefficients(inSize: Int, outSize: Int): Coefficients {
        val scale = inSize.toDouble() / outSize
        val filterScale = Math.max(scale, 1.0)
        val support = 2.0 * filterScale
        val inv = 1.0 / filterScale
        val one = (1 shl PRECISION_BITS).toDouble()
        val starts = IntArray(outSize)
        val weights = Array(outSize) { IntArray(0) }
        for (xx in 0 until outSize) {
            val center = (xx + 0.5) * scale
            val xmin = Math.max((center - support + 0.5).toInt(), 0)  // toInt truncates toward zero, like C
            val xmax = Math.min((center + support + 0.5).toInt(), inSize)
            val w = DoubleArray(xmax - xmin) { x -> bicubic((x + xmin - center + 0.5) * inv) }
            val total = w.sum()
            if (total != 0.0) for (i in w.indices) w[i] = w[i] / total
            starts[xx] = xmin
            weights[xx] = IntArray(w.size) { i -> if (w[i] < 0) (w[i] * one - 0.5).toInt() else (w[i] * one + 0.5).toInt() }
        }
        return Coefficients(starts, weights)
    }

    private fun clip8(acc: Int): Byte = Math.min(Math.max(acc shr PRECISION_BITS, 0), 255).toByte()

    fun resampleHorizontal(img: Rgb, outW: Int): Rgb {
        val k = coefficients(img.width, outW)
        val out = ByteArray(outW * img.height * 3)
        for (y in 0 until img.height) for (xx in 0 until outW) for (c in 0 until 3) {
            var acc = 1 shl (PRECISION_BITS - 1)
            val w = k.weights[xx]
            for (j in w.indices) acc += img.at(y, k.starts[xx] + j, c) * w[j]
            out[(y * outW + xx) * 3 + c] = clip8(acc)
        }
        return Rgb(outW, img.height, out)
    }

    fun resampleVertical(img: Rgb, outH: Int): Rgb {
        val k = coefficients(img.height, outH)
        val out = ByteArray(img.width * outH * 3)
        for (yy in 0 until outH) for (x in 0 until img.width) for (c in 0 until 3) {
            var acc = 1 shl (PRECISION_BITS - 1)
            val w = k.weights[yy]
            for (j in w.indices) acc += img.at(k.starts[yy] + j, x, c) * w[j]
            out[(yy * img.width + x) * 3 + c] = clip8(acc)
        }
        return Rgb(img.width, outH, out)
    }

    fun verticalFirst(inW: Int, inH: Int, outW: Int, outH: Int): Boolean {
        val shrinkH = inH - outH
        return shrinkH > 0 && shrinkH > (inW - outW) * 2
    }

    fun resize(img: Rgb, width: Int, height: Int): Rgb {
        var out = img
        if (verticalFirst(img.width, img.height, width, height)) {
            if (img.height != height) out = resampleVertical(out, height)
            if (img.width != width) out = resampleHorizontal(out, width)
        } else {
            if (img.width != width) out = resampleHorizontal(out, width)
            if (img.height != height) out = resampleVertical(out, height)
        }
        return out
    }

    fun padToSquare(img: Rgb, color: IntArray): Rgb {
        if (img.width == img.height) return img
        val side = Math.max(img.width, img.height)
        val out = ByteArray(side * side * 3)
        for (i in 0 until side * side) for (c in 0 until 3) out[i * 3 + c] = color[c].toByte()
        val top = (side - img.height) / 2
        val left = (side - img.width) / 2
        for (y in 0 until img.height) {
            System.arraycopy(img.data, y * img.width * 3, out, ((top + y) * side + left) * 3, img.width * 3)
        }
        return Rgb(side, side, out)
    }

    fun crop(img: Rgb, left: Int, top: Int, size: Int): Rgb {
        val out = ByteArray(size * size * 3)
        for (y in 0 until size) System.arraycopy(img.data, ((top + y) * img.width + left) * 3, out, y * size * 3, size * 3)
        return Rgb(size, size, out)
    }

    /** The views the vision encoder gets: tiles (row by row) then the whole image, each S x S. */
    fun imageViews(decoded: Rgb, pre: Preprocessing): List<Rgb> {
        var img = decoded
        if (pre.aspect == "pad") img = padToSquare(img, pre.padColor!!)
        val s = pre.imageSize
        val views = ArrayList<Rgb>()
        if (pre.hires == "tiles") {
            val rows = pre.tileGrid[0]
            val cols = pre.tileGrid[1]
            val big = resize(img, cols * s, rows * s)
            for (r in 0 until rows) for (c in 0 until cols) views.add(crop(big, c * s, r * s, s))
        }
        views.add(resize(img, s, s))
        return views
    }

    /**
     * The runner's image: CHW uint8 of shape (3, V*S, S), the views stacked top to bottom inside each
     * channel plane (what the program's vision_encoder takes). Values 0..255 in an IntArray, as
     * LlmModule.prefillImages(int[], width = S, height = V*S, channels = 3) wants them.
     */
    fun runnerImage(views: List<Rgb>): IntArray {
        val s = views[0].width
        val plane = views.size * s * s
        val out = IntArray(3 * plane)
        for ((v, view) in views.withIndex()) for (y in 0 until s) for (x in 0 until s) for (c in 0 until 3) {
            out[c * plane + (v * s + y) * s + x] = view.at(y, x, c)
        }
        return out
    }

    /** The prompt's segments with the question filled in; empty text segments are dropped. */
    fun promptSegments(m: BundleManifest, question: String): List<Segment> {
        val q = question.trim()
        return m.segments.mapNotNull { seg ->
            if (seg.isImage) seg else seg.text.replace(QUESTION, q).takeIf { it.isNotEmpty() }?.let { Segment(false, it) }
        }
    }

    /**
     * The decoder's power-of-two down-sampling for a [width] x [height] picture: as coarse as possible while
     * the long side (the padded square's side) keeps at least 4x the pixels the largest resize target has,
     * so a 12-megapixel photo is not decoded at full size but the bicubic resize still sees a sharp image.
     * [pre] null (no bundle yet): keep up to 4096 pixels on the long side.
     */
    fun sampleSize(width: Int, height: Int, pre: Preprocessing?): Int {
        val target = if (pre == null) 1024 else pre.imageSize * if (pre.hires == "tiles") Math.max(pre.tileGrid[0], pre.tileGrid[1]) else 1
        val longSide = Math.max(width, height)
        var n = 1
        while (longSide / (n * 2) >= 4 * target) n *= 2
        return n
    }

    /** BOS tokens the runner prefills as tokens (num_bos): 1 only when BOS is not in the first text. */
    fun bosTokens(m: BundleManifest): Int = if (m.addBos && !m.bosInFirstText) 1 else 0
}
