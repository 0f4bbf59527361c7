// ExecuTorch path: ExecuTorchLLM's MultimodalRunner (Swift package from github.com/pytorch/executorch,
// branch swiftpm-1.5.1), fed the manifest's segments in order.
import ExecuTorchLLM
import Foundation

final class ExecuTorchEngine: Engine {
    private let bundle: LoadedBundle
    private let runner: MultimodalRunner

    init(_ bundle: LoadedBundle) throws {
        self.bundle = bundle
        // the tokenizer *folder* (tokenizer.json inside), as mobilemllm's Python runner passes it
        runner = MultimodalRunner(modelPath: bundle.path(bundle.manifest.programFile!),
                                  tokenizerPath: bundle.path(bundle.manifest.tokenizerDir))
        try runner.load()
    }

    func answer(_ image: BundleInputs.Rgb, _ question: String, maxNewTokens: Int, temperature: Double,
                onText: @escaping (String) -> Void) throws -> AnswerStats {
        let m = bundle.manifest
        let views = BundleInputs.imageViews(image, m.preprocessing)
        let s = m.preprocessing.imageSize
        let pixels = Data(BundleInputs.runnerImage(views))
        let inputs: [MultimodalInput] = BundleInputs.promptSegments(m, question).map { seg in
            seg.isImage
                ? MultimodalInput(ExecuTorchLLM.Image(data: pixels, width: s, height: views.count * s, channels: 3))
                : MultimodalInput(seg.text)
        }
        runner.reset()  // each question starts from an empty context
        var clock = StreamClock()
        try runner.generate(inputs, Config {
            $0.sequenceLength = m.maxContextLen
            $0.maximumNewTokens = maxNewTokens
            $0.temperature = temperature
            $0.bosCount = BundleInputs.bosTokens(m)  // 0 when "<s>" already starts the first text
            $0.eosCount = 0
            $0.echoEnabled = false
        }) { piece in
            clock.piece()
            onText(piece)
        }
        return clock.stats
    }

    func stop() { runner.stop() }
}
