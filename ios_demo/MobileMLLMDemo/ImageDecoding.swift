// Picture -> RGB bytes. The raw pixels of the CGImage are used (EXIF orientation is not applied, as
// Pillow does not apply it in training); alpha is dropped, as Pillow's convert("RGB") does.
import UIKit

enum ImageDecoding {
    static func rgb(_ image: UIImage) throws -> BundleInputs.Rgb {
        guard let cg = image.cgImage else { throw ManifestError("cannot read that picture's pixels") }
        let w = cg.width, h = cg.height
        var rgba = [UInt8](repeating: 0, count: w * h * 4)
        let drawn: Bool = rgba.withUnsafeMutableBytes { buf in
            guard let ctx = CGContext(data: buf.baseAddress, width: w, height: h, bitsPerComponent: 8, bytesPerRow: w * 4,
                                      space: CGColorSpace(name: CGColorSpace.sRGB)!,
                                      bitmapInfo: CGImageAlphaInfo.noneSkipLast.rawValue | CGBitmapInfo.byteOrder32Big.rawValue)
            else { return false }
            ctx.draw(cg, in: CGRect(x: 0, y: 0, width: w, height: h))
            return true
        }
        guard drawn else { throw ManifestError("cannot convert that picture to RGB") }
        var out = [UInt8](repeating: 0, count: w * h * 3)
        for i in 0..<(w * h) {
            out[i * 3] = rgba[i * 4]
            out[i * 3 + 1] = rgba[i * 4 + 1]
            out[i * 3 + 2] = rgba[i * 4 + 2]
        }
        return BundleInputs.Rgb(width: w, height: h, data: out)
    }
}
