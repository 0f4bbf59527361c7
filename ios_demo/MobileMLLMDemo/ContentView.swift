// Pick a bundle, pick or take a picture, ask, and ask again: follow-up questions continue the conversation
// (the runner keeps its KV cache); a new picture or "New chat" starts a new one. Answers stream in with time
// to first token and decode tokens/s. Every failure (no bundle, wrong manifest version, out of memory, runner error) is shown in
// red instead of crashing.
import PhotosUI
import SwiftUI
import UniformTypeIdentifiers

@MainActor
final class DemoModel: ObservableObject {
    @Published var bundles: [String] = BundleStore.list()
    @Published var selected: String?
    @Published var info = ""
    @Published var image: UIImage? { didSet { imageVersion += 1; transcript = "" } }  // a new picture: a new chat
    @Published var question = ""
    @Published var transcript = ""
    @Published var stats = ""
    @Published var error: String?
    @Published var busy = false
    @Published var ready = false
    private var engine: Engine?
    private var imageVersion = 0
    private var engineImageVersion = -1  // the picture the engine's conversation is about
    private let maxNewTokens = 128

    func refresh() { bundles = BundleStore.list() }

    func importBundle(_ result: Result<URL, Error>) {
        do {
            let name = try BundleStore.importFolder(try result.get())
            refresh()
            open(name)
        } catch { self.error = error.localizedDescription }
    }

    func open(_ name: String) {
        selected = name
        error = nil
        info = "loading \(name)…"
        ready = false
        engine = nil
        engineImageVersion = -1
        transcript = ""
        Task.detached(priority: .userInitiated) {
            do {
                let bundle = try BundleStore.open(name)
                let engine: Engine = bundle.manifest.format == "coreml"
                    ? try await CoreMLEngine(bundle) : try ExecuTorchEngine(bundle)
                let m = bundle.manifest
                let text = "\(m.modelName) · \(m.format)/\(m.target) · \(m.preprocessing.imageSize)px → " +
                    "\(m.numVisualTokens) visual tokens · \(m.maxContextLen)-token context" +
                    (m.parityPassed ? "" : " · parity FAILED at export")
                await MainActor.run { self.engine = engine; self.info = text; self.ready = true }
            } catch {
                await MainActor.run { self.error = "cannot load \(name): \(error.localizedDescription)"; self.info = "" }
            }
        }
    }

    /// "New chat": the same picture, a new conversation.
    func newChat() {
        guard !busy else { return }
        engine?.chat.newChat()
        transcript = ""
        stats = ""
        error = nil
    }

    func ask() {
        if busy { engine?.stop(); return }
        guard let engine else { error = "import and pick a bundle first"; return }
        guard let image else { error = "pick or take a picture first"; return }
        guard !question.trimmingCharacters(in: .whitespacesAndNewlines).isEmpty else { error = "type a question"; return }
        error = nil
        stats = ""
        busy = true
        let q = question, n = maxNewTokens, version = imageVersion, newImage = imageVersion != engineImageVersion
        question = ""
        transcript += (transcript.isEmpty ? "" : "\n\n") + "You: \(q.trimmingCharacters(in: .whitespacesAndNewlines))\nModel: "
        Task.detached(priority: .userInitiated) {
            do {
                if newImage { engine.setImage(try ImageDecoding.rgb(image)) }
                await MainActor.run { self.engineImageVersion = version }
                let st = try engine.answer(q, maxNewTokens: n, temperature: 0) { piece in
                    Task { @MainActor in self.transcript += piece }
                }
                let rate = st.decodeTokensPerS.map { String(format: "%.1f", $0) } ?? "–"
                let used = engine.chat.used
                await MainActor.run {
                    self.stats = String(format: "time to first token %.0f ms · decode %@ tok/s · %d tokens · at most %d context tokens used",
                                        st.ttftMs, rate, st.generated, used)
                    self.busy = false
                }
            } catch {
                await MainActor.run {
                    self.error = error is ContextFullError || error is ManifestError
                        ? error.localizedDescription : "generation failed: \(error.localizedDescription)"
                    self.busy = false
                }
            }
        }
    }
}

struct ContentView: View {
    @StateObject private var model = DemoModel()
    @State private var photo: PhotosPickerItem?
    @State private var importing = false
    @State private var camera = false

    var body: some View {
        NavigationStack {
            Form {
                Section("Bundle") {
                    if model.bundles.isEmpty {
                        Text("No bundles yet: tap + and pick a folder written by `mobilemllm export --target ios`, or drop one into MobileMLLM's Documents in Finder.")
                    }
                    Picker("Bundle", selection: Binding(get: { model.selected }, set: { if let n = $0 { model.open(n) } })) {
                        ForEach(model.bundles, id: \.self) { Text($0).tag(Optional($0)) }
                    }
                    if !model.info.isEmpty { Text(model.info).font(.footnote).foregroundStyle(.secondary) }
                }
                Section("Image") {
                    HStack {
                        PhotosPicker("Pick image", selection: $photo, matching: .images)
                        Spacer()
                        Button("Take photo") { camera = true }
                            .disabled(!UIImagePickerController.isSourceTypeAvailable(.camera))
                    }
                    if let image = model.image {
                        SwiftUI.Image(uiImage: image).resizable().scaledToFit().frame(maxHeight: 220)
                    }
                }
                Section("Ask") {
                    if !model.transcript.isEmpty { Text(model.transcript).textSelection(.enabled) }
                    TextField("What colour is the shape?", text: $model.question)
                    HStack {
                        Button(model.busy ? "Stop" : "Ask") { model.ask() }.disabled(!model.ready)
                        Spacer()
                        Button("New chat") { model.newChat() }.disabled(model.busy || model.transcript.isEmpty)
                    }
                    if !model.stats.isEmpty { Text(model.stats).font(.footnote.monospacedDigit()) }
                }
                if let error = model.error {
                    Section { Text(error).foregroundStyle(.red) }
                }
            }
            .refreshable { model.refresh() }  // bundles dropped into Documents/ with Finder
            .onAppear { model.refresh() }
            .navigationTitle("MobileMLLM")
            .toolbar { Button { importing = true } label: { Image(systemName: "plus") } }
            .fileImporter(isPresented: $importing, allowedContentTypes: [.folder]) { model.importBundle($0) }
            .sheet(isPresented: $camera) { CameraPicker { model.image = $0 } }
            .onChange(of: photo) { _, item in
                Task {
                    if let data = try? await item?.loadTransferable(type: Data.self), let img = UIImage(data: data) {
                        model.image = img
                    } else if item != nil {
                        model.error = "cannot read that picture"
                    }
                }
            }
        }
    }
}

/// The system camera, returning the photo taken.
struct CameraPicker: UIViewControllerRepresentable {
    let onImage: (UIImage) -> Void
    @Environment(\.dismiss) private var dismiss

    func makeUIViewController(context: Context) -> UIImagePickerController {
        let picker = UIImagePickerController()
        picker.sourceType = .camera
        picker.delegate = context.coordinator
        return picker
    }

    func updateUIViewController(_ controller: UIImagePickerController, context: Context) {}
    func makeCoordinator() -> Coordinator { Coordinator(self) }

    final class Coordinator: NSObject, UIImagePickerControllerDelegate, UINavigationControllerDelegate {
        let parent: CameraPicker
        init(_ parent: CameraPicker) { self.parent = parent }
        func imagePickerController(_ picker: UIImagePickerController,
                                   didFinishPickingMediaWithInfo info: [UIImagePickerController.InfoKey: Any]) {
            if let img = info[.originalImage] as? UIImage { parent.onImage(img) }
            parent.dismiss()
        }
        func imagePickerControllerDidCancel(_ picker: UIImagePickerController) { parent.dismiss() }
    }
}
