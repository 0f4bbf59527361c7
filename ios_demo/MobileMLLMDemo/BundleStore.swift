// Bundles live in the app's Documents folder: Documents/<name>/ (dropped in with Finder's file sharing, or
// the Files app) and Documents/bundles/<name>/ (copied in by the + button's importer). A folder is a bundle
// when it has a manifest.json; a bundle is named by its path under Documents ("tiny-ios", "bundles/tiny-ios").
import Foundation

struct LoadedBundle {
    let dir: URL
    let manifest: BundleManifest
    func url(_ rel: String) -> URL { dir.appendingPathComponent(rel) }
    func path(_ rel: String) -> String { url(rel).path }
}

enum BundleStore {
    static var documents: URL { FileManager.default.urls(for: .documentDirectory, in: .userDomainMask)[0] }
    /// Where the importer copies bundles.
    static var root: URL { documents.appendingPathComponent("bundles") }

    /// Bundles in Documents/ and Documents/bundles/, as paths under Documents, sorted.
    static func list(in top: URL = BundleStore.documents) -> [String] {
        let fm = FileManager.default
        func bundles(_ folder: String) -> [String] {
            let dir = folder.isEmpty ? top : top.appendingPathComponent(folder)
            let names = (try? fm.contentsOfDirectory(atPath: dir.path)) ?? []
            return names.filter { !$0.hasPrefix(".") }
                .filter { fm.fileExists(atPath: dir.appendingPathComponent($0).appendingPathComponent("manifest.json").path) }
                .map { folder.isEmpty ? $0 : "\(folder)/\($0)" }
        }
        return (bundles("") + bundles("bundles")).sorted()
    }

    /// Copy a picked bundle folder into the app (security-scoped URL from the Files importer).
    static func importFolder(_ src: URL) throws -> String {
        let scoped = src.startAccessingSecurityScopedResource()
        defer { if scoped { src.stopAccessingSecurityScopedResource() } }
        let fm = FileManager.default
        guard fm.fileExists(atPath: src.appendingPathComponent("manifest.json").path) else {
            throw ManifestError("\(src.lastPathComponent) has no manifest.json: pick the folder `mobilemllm export` wrote")
        }
        try fm.createDirectory(at: root, withIntermediateDirectories: true)
        let dest = root.appendingPathComponent(src.lastPathComponent)
        let tmp = root.appendingPathComponent(".\(src.lastPathComponent).partial")
        try? fm.removeItem(at: tmp)
        try fm.copyItem(at: src, to: tmp)  // copy, then swap in: never a half-copied bundle
        try? fm.removeItem(at: dest)
        try fm.moveItem(at: tmp, to: dest)
        return "bundles/\(dest.lastPathComponent)"
    }

    static func open(_ name: String) throws -> LoadedBundle {
        let dir = documents.appendingPathComponent(name)
        let data: Data
        do { data = try Data(contentsOf: dir.appendingPathComponent("manifest.json")) } catch {
            throw ManifestError("no bundle at \(dir.path): import one with the + button, or drop the folder into MobileMLLM's Documents in Finder")
        }
        let manifest = try BundleManifest.parse(data)
        var problems: [String] = []
        for (rel, size) in manifest.fileSizes.sorted(by: { $0.key < $1.key }) {
            let attrs = try? FileManager.default.attributesOfItem(atPath: dir.appendingPathComponent(rel).path)
            if let actual = attrs?[.size] as? Int {
                if actual != size { problems.append("\(rel) is \(actual) bytes, the manifest says \(size)") }
            } else {
                problems.append("\(rel) is missing")
            }
        }
        guard problems.isEmpty else {
            throw ManifestError("the bundle \(name) is incomplete: \(problems.joined(separator: "; ")). Import it again")
        }
        return LoadedBundle(dir: dir, manifest: manifest)
    }
}
