// The two ways the app runs a bundle: ExecuTorch's MultimodalRunner (format "executorch", the same C++
// runner as android_demo and `mobilemllm generate --bundle`) and Core ML packages (format "coreml").
// Both hold one conversation (ChatSession): follow-ups continue it, a new image or "New chat" starts anew.
import Foundation

/// The numbers the app shows after an answer (app clock: the Swift runner API reports no stats).
struct AnswerStats {
    let ttftMs: Double           // first input handed over -> first streamed piece (image + prefill)
    let decodeTokensPerS: Double?  // pieces after the first / time after the first
    let generated: Int
}

protocol Engine: AnyObject {
    var chat: ChatSession { get }
    /// A new picture: preprocessed now; the next question starts a new conversation.
    func setImage(_ image: BundleInputs.Rgb)
    /// Streams pieces of the answer to `onText`; returns when done, stopped or at `maxNewTokens`. Throws
    /// ContextFullError (nothing ran) when the turn may not fit the model's context.
    func answer(_ question: String, maxNewTokens: Int, temperature: Double,
                onText: @escaping (String) -> Void) throws -> AnswerStats
    func stop()
}

/// Times a stream of pieces the way every engine reports it.
struct StreamClock {
    private let start = DispatchTime.now().uptimeNanoseconds
    private(set) var first: UInt64?
    private(set) var last: UInt64?
    private(set) var count = 0

    mutating func piece() {
        let now = DispatchTime.now().uptimeNanoseconds
        if first == nil { first = now }
        last = now
        count += 1
    }

    var stats: AnswerStats {
        let ttft = first.map { Double($0 - start) / 1e6 } ?? -1
        var rate: Double?
        if let f = first, let l = last, count > 1, l > f { rate = Double(count - 1) / (Double(l - f) / 1e9) }
        return AnswerStats(ttftMs: ttft, decodeTokensPerS: rate, generated: count)
    }
}
