// Core ML path, for bundles exported with `mobilemllm export --target coreml` (format "coreml"):
// vision.mlpackage (pixels (V,3,S,S) float 0...255 -> image embeddings), embed.mlpackage (ids -> embeddings)
// and a stateful decoder.mlpackage (inputs_embeds + additive causal_mask -> last logits; the KV cache is
// a Core ML state, iOS 18). Text is tokenized with swift-transformers' Tokenizers from tokenizer.json.
// Greedy or temperature sampling, stopping at the manifest's eos_ids; the decoder state is kept between the
// turns of a conversation (ChatSession), as ExecuTorch's runner keeps its KV cache.
import CoreML
import Foundation
import Tokenizers

final class CoreMLEngine: Engine {
    private let bundle: LoadedBundle
    private let vision: MLModel
    private let embed: MLModel
    private let decoder: MLModel
    private let tokenizer: Tokenizer
    let chat: ChatSession
    private var views: [BundleInputs.Rgb]?
    private var state: MLState?  // the decoder's KV cache: kept between the turns of one conversation
    private var past = 0
    private var stopped = false
    static let maskMin: Float = -1e4  // the exporter's additive mask value (finite in fp16)

    init(_ bundle: LoadedBundle) async throws {
        self.bundle = bundle
        chat = ChatSession(bundle.manifest)
        let config = MLModelConfiguration()
        config.computeUnits = .all
        func load(_ part: String) async throws -> MLModel {
            let compiled = try await MLModel.compileModel(at: bundle.url(bundle.manifest.graphs[part]!.file))
            return try MLModel(contentsOf: compiled, configuration: config)
        }
        vision = try await load("vision_encoder")
        embed = try await load("token_embedding")
        decoder = try await load("text_decoder")
        tokenizer = try await AutoTokenizer.from(modelFolder: bundle.url(bundle.manifest.tokenizerDir))
    }

    func stop() { stopped = true }

    private func graph(_ part: String) -> GraphEntry { bundle.manifest.graphs[part]! }

    private func run(_ model: MLModel, _ part: String, _ inputs: [String: MLMultiArray], state: MLState? = nil) throws -> MLMultiArray {
        let provider = try MLDictionaryFeatureProvider(dictionary: inputs.mapValues { MLFeatureValue(multiArray: $0) })
        let out = try state.map { try model.prediction(from: provider, using: $0) } ?? model.prediction(from: provider)
        guard let a = out.featureValue(for: graph(part).outputs[0])?.multiArrayValue else {
            throw ManifestError("\(part) returned no '\(graph(part).outputs[0])'")
        }
        return a
    }

    /// A float array of the type the package declares for input `index` of `part` (fp16 or fp32).
    private func floatArray(_ part: String, _ index: Int, _ shape: [Int]) throws -> MLMultiArray {
        let type: MLMultiArrayDataType = graph(part).inputDtypes[index] == "float16" ? .float16 : .float32
        return try MLMultiArray(shape: shape.map { NSNumber(value: $0) }, dataType: type)
    }

    private func embedIds(_ ids: [Int]) throws -> MLMultiArray {
        let a = try MLMultiArray(shape: [1, NSNumber(value: ids.count)], dataType: .int32)
        for (i, id) in ids.enumerated() { a[i] = NSNumber(value: id) }
        return try run(embed, "token_embedding", [graph("token_embedding").inputs[0]: a])
    }

    private func decode(_ embeds: MLMultiArray, past: Int, state: MLState) throws -> [Float] {
        let n = embeds.shape[1].intValue
        let end = past + n
        let mask = try floatArray("text_decoder", 1, [1, 1, n, end])
        for i in 0..<n { for j in 0..<end { mask[i * end + j] = NSNumber(value: j <= past + i ? 0 : Self.maskMin) } }
        let g = graph("text_decoder")
        let x = g.inputDtypes[0] == "float16" && embeds.dataType != .float16
            ? MLMultiArray(concatenating: [embeds], axis: 1, dataType: .float16) : embeds
        let logits = try run(decoder, "text_decoder", [g.inputs[0]: x, g.inputs[1]: mask], state: state)
        return (0..<logits.count).map { logits[$0].floatValue }
    }

    private func pick(_ logits: [Float], _ temperature: Double) -> Int {
        if temperature <= 0 { return logits.indices.max { logits[$0] < logits[$1] }! }
        let m = logits.max()!
        let p = logits.map { exp(Double($0 - m) / temperature) }
        var r = Double.random(in: 0..<p.reduce(0, +))
        for (i, v) in p.enumerated() { r -= v; if r <= 0 { return i } }
        return p.count - 1
    }

    func setImage(_ rgb: BundleInputs.Rgb) {
        views = BundleInputs.imageViews(rgb, bundle.manifest.preprocessing)
        chat.newChat()
    }

    func answer(_ question: String, maxNewTokens: Int, temperature: Double,
                onText: @escaping (String) -> Void) throws -> AnswerStats {
        stopped = false
        let m = bundle.manifest
        guard let views else { throw ManifestError("pick or take a picture first") }
        let calls = try chat.plan(question)
        chat.begin()
        var clock = StreamClock()
        var parts: [MLMultiArray] = []
        for call in calls {
            switch call {
            case .reset:
                state = decoder.makeState()
                past = 0
            case .bos(let n):
                if n > 0, let bos = m.bosId { parts.append(try embedIds([Int](repeating: bos, count: n))) }
            case .image:
                let s = m.preprocessing.imageSize
                let px = try floatArray("vision_encoder", 0, [views.count, 3, s, s])
                for (i, v) in BundleInputs.viewsNCHW(views).enumerated() { px[i] = NSNumber(value: Float(v)) }
                parts.append(try run(vision, "vision_encoder", [graph("vision_encoder").inputs[0]: px]))
            case .text(let t):
                parts.append(try embedIds(tokenizer.encode(text: t, addSpecialTokens: false)))
            }
        }
        guard let state else { throw ManifestError("no conversation to continue: ask again") }
        let prompt = MLMultiArray(concatenating: parts, axis: 1, dataType: .float32)
        var logits = try decode(prompt, past: past, state: state)
        past += prompt.shape[1].intValue
        var tokens: [Int] = []
        var emitted = ""
        var text = AnswerText(endOfTurn: m.followUp?.endOfTurn)
        while tokens.count < maxNewTokens && past < m.maxContextLen && !stopped {
            let token = pick(logits, temperature)
            if m.eosIds.contains(token) {  // not fed: the cache holds the answer, as ExecuTorch's runner leaves it
                if let eot = m.followUp?.endOfTurn { _ = text.add(eot) }
                break
            }
            tokens.append(token)
            let decoded = tokenizer.decode(tokens: tokens)
            if !decoded.hasSuffix("\u{FFFD}") && decoded.count > emitted.count {  // wait for a whole character
                clock.piece()
                let shown = text.add(String(decoded.dropFirst(emitted.count)))
                if !shown.isEmpty { onText(shown) }
                emitted = decoded
            }
            logits = try decode(try embedIds([token]), past: past, state: state)
            past += 1
        }
        chat.finish(question, calls, text)
        return clock.stats
    }
}
