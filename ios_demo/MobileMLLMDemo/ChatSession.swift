// One image and the turns about it: which runner calls the next question needs. The same rules as
// mobilemllm/bundle/app_inputs.py's AppChat and android_demo's ChatSession.kt (compiled and replayed
// through ExecuTorch's runner in tests/test_app_contract.py; this file follows them step for step):
//
// - the first question about an image: reset, then the manifest's prompt segments;
// - a follow-up after an answer that ended with the end-of-turn token: no reset; the runner's KV cache
//   holds every answer token but that last one, so the app sends the end-of-turn text and the next turn
//   (prompt.follow_up), exactly as training writes a multi-turn conversation;
// - a follow-up after an answer cut short (Stop, the token limit, an error): the whole conversation is
//   sent again from an empty context;
// - a turn that may not fit the context (a bound: at least one UTF-8 byte per token) is refused with one
//   clear message before anything runs.
import Foundation

struct ContextFullError: LocalizedError {
    let message: String
    var errorDescription: String? { message }
}

/// One runner call: reset, BOS tokens (num_bos), text, or the image.
enum Call: Equatable {
    case reset
    case bos(Int)
    case text(String)
    case image
}

/// Pieces in, the answer out: leading whitespace dropped (the template puts a space before every answer),
/// trailing whitespace held back until more text follows, the end-of-turn piece recognised and not shown.
/// ExecuTorchLLM's Objective-C layer turns each piece into an NSString (`@(token.c_str())`): a piece that
/// ends inside a multi-byte character arrives empty, its bytes lost before Swift sees them, so a run of
/// empty pieces is shown as one U+FFFD instead of silently dropping a character.
struct AnswerText {
    let endOfTurn: String?
    private var raw = ""
    private var shown = ""
    private var lostRun = false
    private(set) var pieces = 0
    private(set) var endedAtEndOfTurn = false

    init(endOfTurn: String?) { self.endOfTurn = endOfTurn }

    /// Adds a piece; returns the new text to show (may be empty).
    mutating func add(_ piece: String) -> String {
        pieces += 1
        var p = piece
        if p.isEmpty {
            if !lostRun { raw += "\u{FFFD}" }
            lostRun = true
        } else {
            lostRun = false
        }
        if let eot = endOfTurn, p.hasSuffix(eot) {
            p = String(p.dropLast(eot.count))
            endedAtEndOfTurn = true
        }
        raw += p
        let visible = raw.trimmingCharacters(in: .whitespacesAndNewlines)
        guard visible.count > shown.count, visible.hasPrefix(shown) else { return "" }
        let delta = String(visible.dropFirst(shown.count))
        shown = visible
        return delta
    }

    var text: String { raw.trimmingCharacters(in: .whitespacesAndNewlines) }
}

final class ChatSession {
    let manifest: BundleManifest
    private var turns: [(String, String)] = []
    private(set) var cacheContinues = false
    private(set) var used = 0

    init(_ manifest: BundleManifest) { self.manifest = manifest }

    /// A new picture, or "New chat": the next question starts a new conversation.
    func newChat() {
        turns.removeAll()
        cacheContinues = false
    }

    var turnCount: Int { turns.count }

    /// The calls for `question` after the turns so far (AppChat.calls).
    func plan(_ question: String) throws -> [Call] {
        guard !question.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty else {
            throw ManifestError("type a question about the image")
        }
        let continues = !turns.isEmpty && cacheContinues && manifest.followUp != nil
        let calls = continues ? try followUpCalls(question) : [.reset] + (try conversationCalls(question))
        let start = continues ? used : 0
        let limit = manifest.maxContextLen
        if start + tokenBound(calls) + 1 > limit {
            throw ContextFullError(message: turns.isEmpty
                ? "the question is too long for the model's context (\(limit) tokens): shorten it"
                : "this conversation has filled the model's context (\(limit) tokens): pick a new image or start a new chat")
        }
        return calls
    }

    private func followUp() throws -> FollowUp {
        guard let fu = manifest.followUp else {
            throw ManifestError("this bundle's template '\(manifest.template)' has no chat turns")
        }
        return fu
    }

    private func followUpCalls(_ question: String) throws -> [Call] {
        let fu = try followUp()
        let q = question.trimmingCharacters(in: .whitespacesAndNewlines)
        return ([fu.endOfTurn] + fu.segments.map { $0.replacingOccurrences(of: BundleInputs.question, with: q) })
            .filter { !$0.isEmpty }.map { Call.text($0) }
    }

    private func conversationCalls(_ question: String) throws -> [Call] {
        let questions = turns.map { $0.0 } + [question]
        var calls: [Call] = [.bos(BundleInputs.bosTokens(manifest))]
        for seg in BundleInputs.promptSegments(manifest, questions[0]) { calls.append(seg.isImage ? .image : .text(seg.text)) }
        for (i, turn) in turns.enumerated() {
            let answer = try followUp().answer.replacingOccurrences(of: "{answer}", with: turn.1)
            if !answer.isEmpty { calls.append(.text(answer)) }
            calls += try followUpCalls(questions[i + 1])
        }
        guard case .text = calls.last else {
            throw ManifestError("the prompt must end with a text segment (template '\(manifest.template)')")
        }
        return calls
    }

    /// At most how many positions `calls` fill (AppChat's token_bound).
    func tokenBound(_ calls: [Call]) -> Int {
        calls.reduce(0) { n, call in
            switch call {
            case .reset: return n
            case .bos(let k): return n + k
            case .image: return n + manifest.numVisualTokens
            case .text(let t): return n + t.utf8.count + 1
            }
        }
    }

    /// Records an answer; `pieces` streamed. The Swift runner API reports no stats, so the cache's use is bounded.
    func finish(_ question: String, _ calls: [Call], _ answer: AnswerText) {
        let start = calls.first == .reset ? 0 : used
        used = start + tokenBound(calls) + answer.pieces
        turns.append((question.trimmingCharacters(in: .whitespacesAndNewlines), answer.text))
        cacheContinues = answer.endedAtEndOfTurn
    }

    /// Before a turn runs: until it completes, the cache's content is unknown.
    func begin() { cacheContinues = false }
}
