plugins {
    id("com.android.application")
    id("org.jetbrains.kotlin.android")
}

// The ExecuTorch runtime must match the executorch the bundle was exported with (pyproject.toml pins
// executorch==1.5.1): the .pte format and the LLM runner's method contract are versioned together.
val executorchVersion = "1.5.1"

android {
    namespace = "org.mobilemllm.demo"
    compileSdk = 35

    defaultConfig {
        applicationId = "org.mobilemllm.demo"
        minSdk = 28        // ImageDecoder; ExecuTorch's AAR itself needs 23
        targetSdk = 35
        versionCode = 1
        versionName = "0.1.0"
        ndk { abiFilters += listOf("arm64-v8a", "x86_64") }  // the ABIs executorch-android ships
    }

    buildTypes {
        release {
            isMinifyEnabled = false
            signingConfig = signingConfigs.getByName("debug")  // a demo: sign release with the debug key
        }
    }
    compileOptions {
        sourceCompatibility = JavaVersion.VERSION_17
        targetCompatibility = JavaVersion.VERSION_17
    }
    kotlinOptions { jvmTarget = "17" }
    packaging { jniLibs { useLegacyPackaging = true } }  // .so files extracted, as ExecuTorch's demo apps do
}

dependencies {
    implementation("org.pytorch:executorch-android:$executorchVersion")
    implementation("com.facebook.soloader:soloader:0.10.5")
    implementation("com.facebook.fbjni:fbjni:0.7.0")
    implementation("androidx.appcompat:appcompat:1.7.0")
    implementation("androidx.activity:activity-ktx:1.9.3")
    testImplementation("junit:junit:4.13.2")
    // android.jar's org.json is a stub in local JVM tests; the real one (Android's API) for src/test.
    testImplementation("org.json:json:20240303")
}
