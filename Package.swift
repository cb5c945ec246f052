// swift-tools-version:6.0
import PackageDescription

// shaderc is linked statically: Debian's libshaderc.so.1 is under-linked (it has undefined glslang
// symbols and no NEEDED entries for them). This order resolves every symbol without a linker group
// (see docs/architecture.md). No unsafeFlags anywhere: vkflex must be usable as a versioned dependency.
let shadercLibraries: [LinkerSetting] = [
    "shaderc_combined", "glslang", "SPIRV", "MachineIndependent", "OSDependent", "GenericCodeGen",
    "OGLCompiler", "glslang-default-resource-limits", "SPIRV-Tools-opt", "SPIRV-Tools", "stdc++", "m", "pthread",
].map { .linkedLibrary($0) }

let package = Package(
    name: "vkflex",
    platforms: [.macOS(.v13)],
    products: [
        .library(name: "VKFlex", targets: ["VKFlex"]),
        .executable(name: "vkflex", targets: ["vkflex"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.5.0"),
    ],
    targets: [
        .systemLibrary(name: "CVulkan", pkgConfig: "vulkan",
                       providers: [.apt(["libvulkan-dev"])]),
        .target(name: "CShaderc", linkerSettings: shadercLibraries),
        // SPIRV-Tools' optimizer with an explicit pass list (C++ API behind a C function).
        .target(name: "CSPIRVOpt", linkerSettings: ["SPIRV-Tools-opt", "SPIRV-Tools", "stdc++"].map { .linkedLibrary($0) }),
        // The one public error type (FlexError) and what its cases carry.
        .target(name: "VKFlexCore"),
        .target(name: "VKFlexExpr", dependencies: ["VKFlexCore"]),
        // SPIR-V passes (the NV -> KHR cooperative-matrix rewrite): compiler code, no device.
        .target(name: "VKFlexSPIRV", dependencies: ["VKFlexCore", "CSPIRVOpt"]),
        .target(name: "VKFlexVulkan", dependencies: ["VKFlexCore", "VKFlexSPIRV", "CVulkan", "CShaderc", "CSPIRVOpt"]),
        .target(name: "VKFlex", dependencies: ["CVulkan", "VKFlexCore", "VKFlexExpr", "VKFlexVulkan"]),
        .executableTarget(name: "vkflex", dependencies: [
            "VKFlex", .product(name: "ArgumentParser", package: "swift-argument-parser"),
        ]),
        .testTarget(name: "VKFlexExprTests", dependencies: ["VKFlexExpr"]),
        // The shared base class of the Vulkan tests (a validating lavapipe device per process).
        .target(name: "VKFlexTestSupport", dependencies: ["VKFlexVulkan"], path: "Tests/VKFlexTestSupport"),
        .testTarget(name: "VKFlexVulkanTests", dependencies: ["VKFlexVulkan", "VKFlexTestSupport"]),
        .testTarget(name: "VKFlexSPIRVTests", dependencies: ["VKFlexSPIRV", "VKFlexVulkan", "VKFlexTestSupport"]),
        .testTarget(name: "VKFlexTests", dependencies: ["VKFlex", "VKFlexExpr", "VKFlexVulkan", "VKFlexSPIRV", "VKFlexTestSupport"]),
        // Every ```swift example of the README, docs/ and the doc comments, compiled (tools/doc-snippets.py).
        .testTarget(name: "VKFlexDocTests", dependencies: ["VKFlex", "VKFlexSPIRV", "VKFlexTestSupport"]),
    ],
    swiftLanguageModes: [.v6],
    cxxLanguageStandard: .cxx17
)
