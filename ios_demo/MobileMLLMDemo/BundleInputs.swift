// What the app does before calling a runner, as the manifest says: a line-by-line port of
// mobilemllm/bundle/app_inputs.py and android_demo's BundleInputs.kt (the Kotlin twin is compiled and checked
// against Python byte for byte in tests/test_apps.py; this file follows it step for step).
//
// The resize reproduces Pillow 13's bicubic filter exactly: coefficients in Double, normalised, turned
// into 22-bit fixed point, accumulated in integers with rounding, clamped to 0...255; two passes,
// vertical first when the height shrinks by more than twice as many pixels as the width does.
import Foundation

enum BundleInputs {
    static let precisionBits = 22
    static let question = "{question}"

    /// Decoded RGB pixels, row-major HWC.
    struct Rgb {
        let width: Int
        let height: Int
        var data: [UInt8]
        func at(_ y: Int, _ x: Int, _ c: Int) -> Int { Int(data[(y * width + x) * 3 + c]) }
    }

    static func bicubic(_ x0: Double) -> Double {
        let a = -0.5
        let x = abs(x0)
        if x < 1.0 { return ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0 }
        if x < 2.0 { return (((x - 5.0) * x + 8.0) * x - 4.0) * a }
        return 0.0
    }

    static func coefficients(_ inSize: Int, _ outSize: Int) -> (starts: [Int], weights: [[Int]]) {
        let scale = Double(inSize) / Double(outSize)
        let filterScale = max(scale, 1.0)
        let support = 2.0 * filterScale
        let inv = 1.0 / filterScale
        let one = Double(1 << precisionBits)
        var starts = [Int](repeating: 0, count: outSize)
        var weights = [[Int]](repeating: [], count: outSize)
        for xx in 0..<outSize {
            let center = (Double(xx) + 0.5) * scale
            let xmin = max(Int(center - support + 0.5), 0)  // Int(Double) truncates toward zero, like C
            let xmax = min(Int(center + support + 0.5), inSize)
            var w = (0..<(xmax - xmin)).map { x in bicubic((Double(x + xmin) - center + 0.5) * inv) }
            let total = w.reduce(0.0, +)
            if total != 0.0 { w = w.map { $0 / total } }
            starts[xx] = xmin
            weights[xx] = w.map { $0 < 0 ? Int($0 * one - 0.5) : Int($0 * one + 0.5) }
        }
        return (starts, weights)
    }

    static func clip8(_ acc: Int) -> UInt8 { UInt8(min(max(acc >> precisionBits, 0), 255)) }

    static func resampleHorizontal(_ img: Rgb, _ outW: Int) -> Rgb {
        let k = coefficients(img.width, outW)
        var out = [UInt8](repeating: 0, count: outW * img.height * 3)
        for y in 0..<img.height { for xx in 0..<outW { for c in 0..<3 {
            var acc = 1 << (precisionBits - 1)
            for (j, w) in k.weights[xx].enumerated() { acc += img.at(y, k.starts[xx] + j, c) * w }
            out[(y * outW + xx) * 3 + c] = clip8(acc)
        } } }
        return Rgb(width: outW, height: img.height, data: out)
    }

    static func resampleVertical(_ img: Rgb, _ outH: Int) -> Rgb {
        let k = coefficients(img.height, outH)
        var out = [UInt8](repeating: 0, count: img.width * outH * 3)
        for yy in 0..<outH { for x in 0..<img.width { for c in 0..<3 {
            var acc = 1 << (precisionBits - 1)
            for (j, w) in k.weights[yy].enumerated() { acc += img.at(k.starts[yy] + j, x, c) * w }
            out[(yy * img.width + x) * 3 + c] = clip8(acc)
        } } }
        return Rgb(width: img.width, height: outH, data: out)
    }

    static func verticalFirst(_ inW: Int, _ inH: Int, _ outW: Int, _ outH: Int) -> Bool {
        let shrinkH = inH - outH
        return shrinkH > 0 && shrinkH > (inW - outW) * 2
    }

    static func resize(_ img: Rgb, _ width: Int, _ height: Int) -> Rgb {
        var out = img
        if verticalFirst(img.width, img.height, width, height) {
            if img.height != height { out = resampleVertical(out, height) }
            if img.width != width { out = resampleHorizontal(out, width) }
        } else {
            if img.width != width { out = resampleHorizontal(out, width) }
            if img.height != height { out = resampleVertical(out, height) }
        }
        return out
    }

    static func padToSquare(_ img: Rgb, _ color: [Int]) -> Rgb {
        if img.width == img.height { return img }
        let side = max(img.width, img.height)
        var out = [UInt8](repeating: 0, count: side * side * 3)
        for i in 0..<(side * side) { for c in 0..<3 { out[i * 3 + c] = UInt8(color[c]) } }
        let top = (side - img.height) / 2
        let left = (side - img.width) / 2
        for y in 0..<img.height {
            let src = y * img.width * 3
            let dst = ((top + y) * side + left) * 3
            out.replaceSubrange(dst..<(dst + img.width * 3), with: img.data[src..<(src + img.width * 3)])
        }
        return Rgb(width: side, height: side, data: out)
    }

    static func crop(_ img: Rgb, _ left: Int, _ top: Int, _ size: Int) -> Rgb {
        var out = [UInt8]()
        out.reserveCapacity(size * size * 3)
        for y in 0..<size {
            let src = ((top + y) * img.width + left) * 3
            out.append(contentsOf: img.data[src..<(src + size * 3)])
        }
        return Rgb(width: size, height: size, data: out)
    }

    /// The views the vision encoder gets: tiles (row by row) then the whole image, each S x S.
    static func imageViews(_ decoded: Rgb, _ pre: Preprocessing) -> [Rgb] {
        var img = decoded
        if pre.aspect == "pad" { img = padToSquare(img, pre.padColor!) }
        let s = pre.imageSize
        var views: [Rgb] = []
        if pre.hires == "tiles" {
            let rows = pre.tileGrid[0], cols = pre.tileGrid[1]
            let big = resize(img, cols * s, rows * s)
            for r in 0..<rows { for c in 0..<cols { views.append(crop(big, c * s, r * s, s)) } }
        }
        views.append(resize(img, s, s))
        return views
    }

    /// ExecuTorch's image: CHW uint8 (3, V*S, S), the views stacked top to bottom in each channel plane.
    static func runnerImage(_ views: [Rgb]) -> [UInt8] {
        let s = views[0].width
        let plane = views.count * s * s
        var out = [UInt8](repeating: 0, count: 3 * plane)
        for (v, view) in views.enumerated() { for y in 0..<s { for x in 0..<s { for c in 0..<3 {
            out[c * plane + (v * s + y) * s + x] = UInt8(view.at(y, x, c))
        } } } }
        return out
    }

    /// Core ML's vision input: (V, 3, S, S), one view after another.
    static func viewsNCHW(_ views: [Rgb]) -> [UInt8] {
        let s = views[0].width
        var out = [UInt8](repeating: 0, count: views.count * 3 * s * s)
        for (v, view) in views.enumerated() { for c in 0..<3 { for y in 0..<s { for x in 0..<s {
            out[((v * 3 + c) * s + y) * s + x] = UInt8(view.at(y, x, c))
        } } } }
        return out
    }

    /// The prompt's segments with the question filled in; empty text segments are dropped.
    static func promptSegments(_ m: BundleManifest, _ question: String) -> [Segment] {
        let q = question.trimmingCharacters(in: .whitespacesAndNewlines)
        return m.segments.compactMap { seg in
            if seg.isImage { return seg }
            let text = seg.text.replacingOccurrences(of: Self.question, with: q)
            return text.isEmpty ? nil : Segment(isImage: false, text: text)
        }
    }

    /// BOS tokens the runner prefills as tokens (num_bos): 1 only when BOS is not in the first text.
    static func bosTokens(_ m: BundleManifest) -> Int { m.addBos && !m.bosInFirstText ? 1 : 0 }
}
