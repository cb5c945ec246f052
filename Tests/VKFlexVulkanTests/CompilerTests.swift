import Foundation
import VKFlexTestSupport
import XCTest
@testable import VKFlexVulkan

final class CompilerTests: VulkanTestCase {
    func testBrokenShaderErrorNamesTheLine() throws {
        let text = """
        #version 450
        layout(local_size_x = 1) in;
        layout(std430, binding = 0) buffer B { float x[]; };
        void main() {
            x[0] = 1.0;
            x[1] = missing_function(2.0);
        }
        """
        XCTAssertThrowsError(try ShaderCompiler.shared.compile(ShaderSource(name: "broken_test", text: text, defines: [.init("A", "1")]))) { error in
            guard case FlexError.shaderCompile(let e) = error else { return XCTFail("\(error)") }
            XCTAssertEqual(e.line, 6, "line numbers stay the template's even with defines injected: \(e)")
            XCTAssertTrue(e.message.contains("missing_function"), e.message)
            XCTAssertTrue(e.excerpt.contains(">     6 |     x[1] = missing_function(2.0);"), e.excerpt)
            XCTAssertTrue(e.description.contains("broken_test"))
        }
    }

    func testIncludesResolveFromTheLibraryAndMissingOnesAreErrors() throws {
        let lib = ShaderLibrary(files: ["helper.glsl": "float twice(float v) { return 2.0 * v; }\n"])
        let good = "#version 450\n#extension GL_GOOGLE_include_directive : require\n#include \"helper.glsl\"\nlayout(local_size_x = 1) in;\nlayout(std430, binding = 0) buffer B { float x[]; };\nvoid main() { x[0] = twice(x[0]); }\n"
        let words = try ShaderCompiler.shared.compile(ShaderSource(name: "inc", text: good), library: lib)
        XCTAssertEqual(words.first, 0x0723_0203, "SPIR-V magic")
        let bad = good.replacingOccurrences(of: "helper.glsl", with: "nope.glsl")
        XCTAssertThrowsError(try ShaderCompiler.shared.compile(ShaderSource(name: "inc_bad", text: bad), library: lib)) { error in
            XCTAssertTrue("\(error)".contains("nope.glsl"), "\(error)")
        }
    }

    func testDefinesPickTheVariant() throws {
        let text = "#version 450\nlayout(local_size_x = 1) in;\nlayout(std430, binding = 0) buffer B { float x[]; };\nvoid main() { x[0] = VALUE; }\n"
        let p = try device.buildPipeline(PipelineDescription(source: ShaderSource(name: "define", text: text, defines: [.init("VALUE", "42.5")]), bindingCount: 1))
        let b = try device.makeBuffer(bytes: 4)
        try device.record { try $0.dispatch(p, bindings: [BufferBinding(b, writes: true)], groups: (1, 1, 1)) }
        XCTAssertEqual(try b.download(count: 1, as: Float.self), [42.5])
    }

    func testSpecializationConstantsAndPushConstants() throws {
        let text = "#version 450\nlayout(local_size_x = 1) in;\nlayout(constant_id = 0) const int K = 1;\nlayout(push_constant) uniform P { float add; } pc;\nlayout(std430, binding = 0) buffer B { float x[]; };\nvoid main() { x[0] = float(K) + pc.add; }\n"
        let p = try device.buildPipeline(PipelineDescription(source: ShaderSource(name: "spec", text: text), bindingCount: 1, pushConstantSize: 4, specialization: [7]))
        let b = try device.makeBuffer(bytes: 4)
        try device.record { try $0.dispatch(p, bindings: [BufferBinding(b, writes: true)], pushConstants: Array(Float(0.5).bitPattern.littleEndianBytes), groups: (1, 1, 1)) }
        XCTAssertEqual(try b.download(count: 1, as: Float.self), [7.5])
    }

    func testPipelineCacheCompilesOnceUnderConcurrency() throws {
        struct Key: Hashable, Sendable { let id = UUID() }
        let key = Key()
        let builds = device.pipelineBuilds
        let compiles = ShaderCompiler.shared.compilations
        let desc = try DeviceChecks.subgroupSumDescription(device)
        let got = ThreadSafeArray<ObjectIdentifier>()
        let dev = device!
        DispatchQueue.concurrentPerform(iterations: 16) { _ in
            if let p = try? dev.pipeline(for: key, make: { Thread.sleep(forTimeInterval: 0.05); return desc }) {
                got.append(ObjectIdentifier(p))
            }
        }
        let ids = got.values
        XCTAssertEqual(ids.count, 16)
        XCTAssertEqual(Set(ids).count, 1)
        XCTAssertEqual(device.pipelineBuilds - builds, 1)
        XCTAssertEqual(ShaderCompiler.shared.compilations - compiles, 1)
        // A failing build is reported to every asker, and not retried.
        struct Bad: Hashable, Sendable {}
        let broken = PipelineDescription(source: ShaderSource(name: "bad", text: "#version 450\nvoid main() { nope; }\n"), bindingCount: 0)
        XCTAssertThrowsError(try device.pipeline(for: Bad()) { broken })
        XCTAssertThrowsError(try device.pipeline(for: Bad()) { XCTFail("rebuilt"); return broken })
    }

    func testPersistentPipelineCacheIsWritten() throws {
        let file = try XCTUnwrap(device.pipelineCacheFile)
        _ = try device.pipeline(for: "persist-test") { try DeviceChecks.subgroupSumDescription(device) }
        XCTAssertTrue(FileManager.default.fileExists(atPath: file.path), file.path)
        XCTAssertTrue(file.lastPathComponent.hasPrefix("pipelines-"))
    }

    func testEmbeddedShadersMatchTheShadersFolder() throws {
        let dir = URL(fileURLWithPath: #filePath).deletingLastPathComponent().appendingPathComponent("../../Shaders").standardized
        let names = try FileManager.default.contentsOfDirectory(atPath: dir.path).filter { $0.hasSuffix(".comp") || $0.hasSuffix(".glsl") }
        XCTAssertFalse(names.isEmpty)
        XCTAssertEqual(Set(names), Set(EmbeddedShaders.files.keys), "run tools/embed-shaders.sh")
        for n in names {
            let text = try String(contentsOf: dir.appendingPathComponent(n), encoding: .utf8)
            XCTAssertEqual(text.trimmingCharacters(in: .newlines), EmbeddedShaders.files[n]?.trimmingCharacters(in: .newlines),
                           "\(n) is stale in EmbeddedShaders.swift: run tools/embed-shaders.sh")
        }
        // Every embedded shader compiles (templates that splice generated mods are compiled by their own tests).
        for n in names where n.hasSuffix(".comp") && !(EmbeddedShaders.files[n]!.contains("#include \"flex_")) {
            XCTAssertNoThrow(try ShaderCompiler.shared.compile(ShaderSource(name: n, text: EmbeddedShaders.files[n]!)), n)
        }
    }

    func testDumpShadersWritesTheExpandedSource() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vkflex-dump-\(UUID())")
        setenv("VKFLEX_DUMP_SHADERS", dir.path, 1)
        defer { unsetenv("VKFLEX_DUMP_SHADERS") }
        let text = "#version 450\n#extension GL_GOOGLE_include_directive : require\n#include \"inc.glsl\"\nlayout(local_size_x = 1) in;\nvoid main() { }\n"
        let library = ShaderLibrary(files: ["inc.glsl": "#define FROM_INCLUDE 1\n"])
        for x in ["3", "4"] {
            _ = try ShaderCompiler.shared.compile(ShaderSource(name: "dumped", text: text, defines: [.init("X", x)]), library: library)
        }
        // One standalone file per variant: defines and includes in it, glslc compiles it alone.
        let files = try FileManager.default.contentsOfDirectory(atPath: dir.path).sorted()
        XCTAssertEqual(files.count, 2, "\(files)")
        let dumped = try files.map { try String(contentsOf: dir.appendingPathComponent($0), encoding: .utf8) }
        XCTAssertTrue(files.allSatisfy { $0.hasPrefix("dumped-") && $0.hasSuffix(".comp") }, "\(files)")
        XCTAssertEqual(Set(dumped.map { $0.contains("#define X 3") }), [true, false])
        for d in dumped {
            XCTAssertTrue(d.contains("#define FROM_INCLUDE 1") && !d.contains("#include \"inc.glsl\""), d)
            XCTAssertNoThrow(try ShaderCompiler.shared.compile(ShaderSource(name: "redumped", text: d), library: ShaderLibrary(files: [:])))
        }
    }

    func testShaderDirOverride() throws {
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vkflex-shaders-\(UUID())")
        try FileManager.default.createDirectory(at: dir, withIntermediateDirectories: true)
        try "// override\n".write(to: dir.appendingPathComponent("only.glsl"), atomically: true, encoding: .utf8)
        setenv("VKFLEX_SHADER_DIR", dir.path, 1)
        defer { unsetenv("VKFLEX_SHADER_DIR") }
        XCTAssertEqual(Array(ShaderLibrary.standard.files.keys), ["only.glsl"])
    }
}

extension UInt32 {
    var littleEndianBytes: [UInt8] { withUnsafeBytes(of: self.littleEndian) { Array($0) } }
}

extension CompilerTests {
    func testSPIRVIsCachedOnDiskByEverythingThatDecidesIt() throws {
        let cache = try XCTUnwrap(SPIRVCache.standard)
        // A comment with a fresh UUID makes this source new to the cache.
        let text = "#version 450\n// \(UUID())\n#extension GL_GOOGLE_include_directive : require\n#include \"part.glsl\"\nlayout(local_size_x = 1) in;\nlayout(std430, binding = 0) buffer B { float x[]; };\nvoid main() { x[0] = VALUE; }\n"
        let lib1 = ShaderLibrary(files: ["part.glsl": "#define VALUE 1.0\n"])
        let source = ShaderSource(name: "cached", text: text)
        let key1 = SPIRVCache.key(text: source.expandedText, library: lib1, optimization: source.optimization)
        XCTAssertNil(cache.load(key1))
        let words = try ShaderCompiler.shared.compile(source, library: lib1)
        XCTAssertEqual(cache.load(key1), words, "stored after the first compile")
        XCTAssertEqual(try ShaderCompiler.shared.compile(source, library: lib1), words, "second compile comes from disk")
        var lib2 = lib1
        lib2.files["part.glsl"]! += "// another include text\n"
        XCTAssertNotEqual(SPIRVCache.key(text: source.expandedText, library: lib2, optimization: source.optimization), key1)
        XCTAssertNotEqual(SPIRVCache.key(text: source.expandedText, library: lib1, optimization: .none), key1)
        XCTAssertNotEqual(SPIRVCache.key(text: source.expandedText, library: lib1, optimization: .full), key1)
    }
}

extension CompilerTests {
    func testSPIRVOptimizationModes() throws {
        let text = """
        #version 450
        layout(local_size_x = 1) in;
        layout(std430, binding = 0) buffer B { float x[]; };
        float twice(float v) { float t[2] = float[2](v, v); return t[0] + t[1]; }
        void main() { x[0] = twice(x[1]); }
        """
        defer { unsetenv("VKFLEX_SPIRV_OPT"); unsetenv("VKFLEX_CACHE_DIR") }
        setenv("VKFLEX_CACHE_DIR", FileManager.default.temporaryDirectory.appendingPathComponent("vkflex-opt-\(UUID())").path, 1)
        var sizes: [SPIRVOptimization: Int] = [:]
        for mode in SPIRVOptimization.allCases {
            // Each shader's own recipe, and the same forced on every shader by the environment.
            unsetenv("VKFLEX_SPIRV_OPT")
            XCTAssertNil(try SPIRVOptimization.forced())
            let own = try ShaderCompiler.shared.compile(ShaderSource(name: "opt-\(mode)", text: text, optimization: mode))
            setenv("VKFLEX_SPIRV_OPT", mode == .none ? "0" : mode.rawValue, 1)
            XCTAssertEqual(try SPIRVOptimization.forced(), mode)
            let forced = try ShaderCompiler.shared.compile(ShaderSource(name: "opt-forced", text: text, optimization: mode == .full ? .none : .full))
            XCTAssertEqual(own.first, 0x0723_0203, "\(mode)")
            XCTAssertEqual(own, forced, "\(mode)")
            sizes[mode] = own.count
        }
        // The explicit pass lists inline the helper and drop its array: less code than none.
        XCTAssertLessThan(sizes[.fast]!, sizes[.none]!)
        setenv("VKFLEX_SPIRV_OPT", "1", 1)
        XCTAssertNil(try SPIRVOptimization.forced())
        setenv("VKFLEX_SPIRV_OPT", "turbo", 1)
        XCTAssertThrowsError(try ShaderCompiler.shared.compile(ShaderSource(name: "opt-bad", text: text))) {
            XCTAssertTrue("\($0)".contains("VKFLEX_SPIRV_OPT=turbo is not one of 0, 1, none, full, unroll, fast"), "\($0)")
        }
        unsetenv("VKFLEX_SPIRV_OPT")
        // An unknown pass is an error with the optimizer's words, not a crash.
        let plain = try ShaderCompiler.shared.compile(ShaderSource(name: "opt-plain", text: text, optimization: .none))
        XCTAssertThrowsError(try ShaderCompiler.optimize(plain, passes: ["--no-such-pass"], name: "opt-plain")) {
            XCTAssertTrue("\($0)".contains("spirv-opt failed on opt-plain"), "\($0)")
        }
    }
}
