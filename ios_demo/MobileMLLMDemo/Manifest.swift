// =====================================================================================================
// Manifest.swift: the ONLY file that reads manifest.json fields. Every read is a full dotted path from
// the manifest root ("prompt.segments[].text"; "[]" = each array item, "*" = each map value) passed to
// Node.req/Node.opt. tests/test_apps.py extracts these paths and checks each one exists in
// mobilemllm/schemas/manifest.schema.json. A line-by-line twin of android_demo's Manifest.kt, plus the
// Core ML bundle's graphs.
// =====================================================================================================
import Foundation

/// The manifest version this app reads; a bundle with another one is refused with a clear message.
let supportedSchemaVersion = 1

struct ManifestError: LocalizedError {
    let message: String
    init(_ message: String) { self.message = message }
    var errorDescription: String? { message }
}

/// A JSON value plus its schema path, so each read can be checked against where it is made.
struct Node {
    let value: Any?
    let path: String

    private func child(_ fullPath: String) throws -> Any? {
        let prefix = path.isEmpty ? "" : path + "."
        precondition(fullPath.hasPrefix(prefix) && !fullPath.dropFirst(prefix.count).contains("."),
                     "manifest read '\(fullPath)' made on node '\(path)'")
        guard let map = value as? [String: Any] else { throw ManifestError("manifest: '\(path)' is not an object") }
        let v = map[String(fullPath.dropFirst(prefix.count))]
        return v is NSNull ? nil : v
    }

    func req(_ fullPath: String) throws -> Node {
        guard let v = try child(fullPath) else { throw ManifestError("manifest.json has no '\(fullPath)'") }
        return Node(value: v, path: fullPath)
    }

    func opt(_ fullPath: String) throws -> Node? {
        try child(fullPath).map { Node(value: $0, path: fullPath) }
    }

    private var isBool: Bool {
        guard let n = value as? NSNumber else { return false }
        return CFGetTypeID(n) == CFBooleanGetTypeID()
    }

    func str() throws -> String {
        guard let s = value as? String else { throw ManifestError("manifest: '\(path)' is not a string") }
        return s
    }
    func bool() throws -> Bool {
        guard isBool, let b = value as? Bool else { throw ManifestError("manifest: '\(path)' is not true/false") }
        return b
    }
    func int() throws -> Int {
        guard !isBool, let n = value as? NSNumber, n.doubleValue == n.doubleValue.rounded() else {
            throw ManifestError("manifest: '\(path)' is not an integer")
        }
        return n.intValue
    }
    func items() throws -> [Node] {
        guard let a = value as? [Any] else { throw ManifestError("manifest: '\(path)' is not a list") }
        return a.map { Node(value: $0 is NSNull ? nil : $0, path: path + "[]") }
    }
    func entries() throws -> [(String, Node)] {
        guard let m = value as? [String: Any] else { throw ManifestError("manifest: '\(path)' is not an object") }
        return m.keys.sorted().map { ($0, Node(value: m[$0], path: path + ".*")) }
    }
}

struct Segment: Equatable {
    let isImage: Bool
    let text: String
}

/// prompt.follow_up: how a later turn continues the conversation (training's multi-turn layout).
struct FollowUp {
    let answer: String        // an earlier answer when the conversation is prefilled again ("{answer}")
    let endOfTurn: String     // the end-of-turn token's text: it ends every answer in the cache
    let segments: [String]    // the next turn's text, "{question}" filled in
}

struct Preprocessing {
    let imageSize: Int
    let aspect: String          // "pad" | "resize"
    let padColor: [Int]?        // RGB, required for "pad"
    let resample: String        // "bicubic" (Pillow's, reproduced exactly by BundleInputs)
    let hires: String           // "direct" | "tiles"
    let tileGrid: [Int]         // rows, cols
    let views: Int
    let inputDtype: String
    let inputShape: [Int]
    let normalizeInGraph: Bool
}

/// A Core ML part (vision_encoder, token_embedding, text_decoder): its package and feature names.
struct GraphEntry {
    let file: String
    let inputs: [String]
    let inputDtypes: [String]  // "float16" | "float32" | "int32" (Core ML array types, lower case)
    let outputs: [String]
}

struct BundleManifest {
    let schemaVersion: Int
    let format: String             // "executorch" | "coreml"
    let target: String
    let backend: String?           // ExecuTorch delegate (xnnpack, coreml, ...)
    let modelName: String
    let programFile: String?       // executorch
    let graphs: [String: GraphEntry]  // coreml
    let fileSizes: [String: Int]
    let tokenizerDir: String
    let tokenizerFile: String      // tokenizer.json: what ExecuTorchLLM's MultimodalRunner loads ("path to the tokenizer data")
    let bosId: Int?
    let eosIds: [Int]
    let template: String
    let addBos: Bool
    let bosInFirstText: Bool
    let bosText: String?
    let segments: [Segment]
    let numVisualTokens: Int
    let followUp: FollowUp?        // nil: the template has no chat turns
    let preprocessing: Preprocessing
    let maxSeqLen: Int
    let maxContextLen: Int
    let quantization: [String: String]
    let parityPassed: Bool

    static func parse(_ data: Data) throws -> BundleManifest {
        let json: Any
        do { json = try JSONSerialization.jsonObject(with: data) } catch {
            throw ManifestError("manifest.json is not valid JSON: \(error.localizedDescription)")
        }
        let root = Node(value: json, path: "")
        let version = try root.req("schema_version").int()
        guard version == supportedSchemaVersion else {
            throw ManifestError("this bundle's manifest is version \(version); this app reads version " +
                "\(supportedSchemaVersion). Re-export it with the mobilemllm that matches this app, or update the app")
        }
        let format = try root.req("format").str()
        guard format == "executorch" || format == "coreml" else {
            throw ManifestError("this is a '\(format)' bundle; the iOS demo runs ExecuTorch and Core ML bundles")
        }
        let files = try root.req("files").entries()
        let program = try files.first { try $0.1.opt("files.*.role")?.str() == "program" }?.0
        var graphs: [String: GraphEntry] = [:]
        if let g = try root.opt("graphs") {
            for (part, entry) in try g.entries() {
                graphs[part] = GraphEntry(
                    file: try entry.req("graphs.*.file").str(),
                    inputs: try entry.req("graphs.*.inputs").items().map { try $0.req("graphs.*.inputs[].name").str() },
                    inputDtypes: try entry.req("graphs.*.inputs").items().map { try $0.req("graphs.*.inputs[].dtype").str() },
                    outputs: try entry.req("graphs.*.outputs").items().map { try $0.req("graphs.*.outputs[].name").str() })
            }
        }
        guard let tokenizerFile = try files.first(where: {
            try $0.1.opt("files.*.role")?.str() == "tokenizer" && $0.0.hasSuffix("/tokenizer.json")
        })?.0 else { throw ManifestError("manifest.json lists no tokenizer.json (files.*.role = tokenizer)") }
        let tok = try root.req("tokenizer")
        let prompt = try root.req("prompt")
        let pre = try root.req("preprocessing")
        let ctx = try root.req("context")
        let manifest = BundleManifest(
            schemaVersion: version,
            format: format,
            target: try root.req("target").str(),
            backend: try root.req("export").opt("export.backend")?.str(),
            modelName: try root.req("model").req("model.name").str(),
            programFile: program,
            graphs: graphs,
            fileSizes: Dictionary(uniqueKeysWithValues: try files.map { ($0.0, try $0.1.req("files.*.size").int()) }),
            tokenizerDir: try tok.req("tokenizer.dir").str(),
            tokenizerFile: tokenizerFile,
            bosId: try tok.opt("tokenizer.bos_id")?.int(),
            eosIds: try tok.req("tokenizer.eos_ids").items().map { try $0.int() },
            template: try prompt.req("prompt.template").str(),
            addBos: try prompt.req("prompt.add_bos").bool(),
            bosInFirstText: try prompt.opt("prompt.bos_in_first_text")?.bool() ?? false,
            bosText: try prompt.opt("prompt.bos_text")?.str(),
            segments: try prompt.req("prompt.segments").items().map { seg in
                switch try seg.req("prompt.segments[].type").str() {
                case "image": return Segment(isImage: true, text: "")
                case "text": return Segment(isImage: false, text: try seg.req("prompt.segments[].text").str())
                case let t: throw ManifestError("manifest prompt segment type '\(t)' is not text or image")
                }
            },
            numVisualTokens: try prompt.req("prompt.num_visual_tokens").int(),
            followUp: try prompt.opt("prompt.follow_up").map { fu in
                FollowUp(answer: try fu.req("prompt.follow_up.answer").str(),
                         endOfTurn: try fu.req("prompt.follow_up.end_of_turn").str(),
                         segments: try fu.req("prompt.follow_up.segments").items().map { try $0.req("prompt.follow_up.segments[].text").str() })
            },
            preprocessing: Preprocessing(
                imageSize: try pre.req("preprocessing.image_size").int(),
                aspect: try pre.req("preprocessing.aspect").str(),
                padColor: try pre.opt("preprocessing.pad_color")?.items().map { try $0.int() },
                resample: try pre.req("preprocessing.resample").str(),
                hires: try pre.opt("preprocessing.hires")?.str() ?? "direct",
                tileGrid: try pre.opt("preprocessing.tile_grid")?.items().map { try $0.int() } ?? [1, 1],
                views: try pre.opt("preprocessing.views")?.int() ?? 1,
                inputDtype: try pre.req("preprocessing.input_dtype").str(),
                inputShape: try pre.req("preprocessing.input_shape").items().map { try $0.int() },
                normalizeInGraph: try pre.req("preprocessing.normalize_in_graph").bool()),
            maxSeqLen: try ctx.req("context.max_seq_len").int(),
            maxContextLen: try ctx.req("context.max_context_len").int(),
            quantization: Dictionary(uniqueKeysWithValues: try root.req("quantization").entries().map {
                ($0.0, try $0.1.req("quantization.*.scheme").str())
            }),
            parityPassed: try root.req("parity").req("parity.passed").bool())
        try manifest.check()
        return manifest
    }

    /// What the app can run: refuse anything its preprocessing or engines cannot do, before loading.
    func check() throws {
        let p = preprocessing
        guard p.resample == "bicubic" else { throw ManifestError("preprocessing.resample '\(p.resample)' is not implemented (bicubic is)") }
        guard p.aspect == "pad" || p.aspect == "resize" else { throw ManifestError("preprocessing.aspect '\(p.aspect)' is unknown") }
        if p.aspect == "pad" && p.padColor?.count != 3 { throw ManifestError("preprocessing.pad_color is missing") }
        guard p.hires == "direct" || p.hires == "tiles" else { throw ManifestError("preprocessing.hires '\(p.hires)' is unknown") }
        guard let last = segments.last, !last.isImage else {
            throw ManifestError("the prompt must end with a text segment (template '\(template)')")
        }
        if format == "executorch" {
            guard programFile != nil else { throw ManifestError("manifest.json lists no program file (files.*.role = program)") }
            guard p.inputDtype == "uint8", p.normalizeInGraph else {
                throw ManifestError("this app passes uint8 RGB; the bundle wants \(p.inputDtype)")
            }
            let s = p.imageSize
            guard p.inputShape == [1, 3, p.views * s, s] else {
                throw ManifestError("vision input shape \(p.inputShape) is not [1, 3, views*\(s), \(s)]")
            }
        } else {
            for part in ["vision_encoder", "token_embedding", "text_decoder"] where graphs[part] == nil {
                throw ManifestError("this Core ML bundle has no '\(part)' package")
            }
        }
    }
}
