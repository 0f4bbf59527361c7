import SwiftUI

@main
struct MobileMLLMDemoApp: App {
    var body: some Scene {
        WindowGroup { ContentView() }
    }
}
