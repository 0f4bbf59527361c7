// ExecuTorch path: ExecuTorchLLM's MultimodalRunner (Swift package from github.com/pytorch/executorch,
// branch swiftpm-1.5.1), fed the calls ChatSession plans. The runner keeps its KV cache between generate
// calls until reset(), so a follow-up sends only the end-of-turn text and the next turn.
import ExecuTorchLLM
import Foundation

final class ExecuTorchEngine: Engine {
    private let bundle: LoadedBundle
    private let runner: MultimodalRunner
    let chat: ChatSession
    private var image: ExecuTorchLLM.Image?

    init(_ bundle: LoadedBundle) throws {
        self.bundle = bundle
        let m = bundle.manifest
        chat = ChatSession(m)
        // tokenizer.json, a file ("File system path to the tokenizer data", ExecuTorchLLMMultimodalRunner.h),
        // as ExecuTorch's own Swift test passes it and as Android's LlmModule requires
        runner = MultimodalRunner(modelPath: bundle.path(m.programFile!), tokenizerPath: bundle.path(m.tokenizerFile))
        try runner.load()
    }

    func setImage(_ rgb: BundleInputs.Rgb) {
        let m = bundle.manifest
        let views = BundleInputs.imageViews(rgb, m.preprocessing)
        let s = m.preprocessing.imageSize
        image = ExecuTorchLLM.Image(data: Data(BundleInputs.runnerImage(views)), width: s, height: views.count * s, channels: 3)
        chat.newChat()
    }

    func answer(_ question: String, maxNewTokens: Int, temperature: Double,
                onText: @escaping (String) -> Void) throws -> AnswerStats {
        let m = bundle.manifest
        guard let image else { throw ManifestError("pick or take a picture first") }
        let calls = try chat.plan(question)
        var inputs: [MultimodalInput] = []
        for call in calls {
            switch call {
            case .reset: runner.reset()
            case .bos(let n): if n > 0, let bos = m.bosText { inputs.append(MultimodalInput(bos)) }  // parses to bos_id
            case .image: inputs.append(MultimodalInput(image))
            case .text(let t): inputs.append(MultimodalInput(t))
            }
        }
        chat.begin()
        var clock = StreamClock()
        var text = AnswerText(endOfTurn: m.followUp?.endOfTurn)
        try runner.generate(inputs, Config {
            $0.sequenceLength = m.maxContextLen
            $0.maximumNewTokens = maxNewTokens
            $0.temperature = temperature
            $0.bosCount = 0  // BOS is text: "<s>" starts the first segment, or bosText before the image
            $0.eosCount = 0
            $0.echoEnabled = false
        }) { piece in
            clock.piece()
            let shown = text.add(piece)
            if !shown.isEmpty { onText(shown) }
        }
        chat.finish(question, calls, text)
        return clock.stats
    }

    func stop() { runner.stop() }
}
