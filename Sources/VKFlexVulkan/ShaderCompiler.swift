import CShaderc
import CSPIRVOpt
import Foundation

/// How a shader's SPIR-V goes through SPIRV-Tools' optimizer.
///
/// `none`; `full` (shaderc's "performance" recipe, dozens of passes); `unroll`
/// (``essentialPasses`` plus loop unrolling); `fast` (``essentialPasses``). Each
/// ``ShaderSource`` names its recipe — `fast` unless it says otherwise; vkflex's
/// cooperative-matrix kernel says `full`: NVIDIA's compiler makes a 3-5× slower kernel of the
/// `unroll` and `fast` lists, which leave the unrolled fragment arrays as arrays (a list with a
/// second scalar replacement after unrolling matched `full`; docs/performance.md, "First call"). The optimizer is most of a first call's compile time on
/// large kernels. `VKFLEX_SPIRV_OPT=0|full|unroll|fast` forces one recipe on every shader of a
/// process.
///
/// ```swift
/// let source = ShaderSource(name: "scale", text: glsl, optimization: .full)
/// let words = try ShaderCompiler.shared.compile(source)
/// ```
public enum SPIRVOptimization: String, Sendable, CaseIterable {
    case none, full, unroll, fast

    /// Inline everything into `main`, turn function-local arrays and structs into SSA values,
    /// propagate constants, drop dead code.
    public static let essentialPasses = [
        "--merge-return", "--inline-entry-points-exhaustive", "--eliminate-dead-functions", "--private-to-local",
        "--scalar-replacement=0", "--ssa-rewrite", "--ccp", "--eliminate-dead-code-aggressive",
    ]

    /// The recipe `VKFLEX_SPIRV_OPT` forces on every shader (`0` or a case name), or nil when it is
    /// unset (or `1`): each shader's own. Any other value is an error.
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    public static func forced() throws -> SPIRVOptimization? {
        switch ProcessInfo.processInfo.environment["VKFLEX_SPIRV_OPT"] {
        case nil, ""?, "1"?: return nil
        case "0"?: return SPIRVOptimization.none
        case let value?:
            guard let mode = SPIRVOptimization(rawValue: value) else {
                throw FlexError.invalidArgument("VKFLEX_SPIRV_OPT=\(value) is not one of 0, 1, \(allCases.map(\.rawValue).joined(separator: ", "))")
            }
            return mode
        }
    }

    /// The explicit pass list, for the modes that run one.
    var passes: [String]? {
        switch self {
        case .none, .full: return nil
        case .unroll: return Self.essentialPasses + ["--loop-unroll", "--ccp", "--eliminate-dead-code-aggressive"]
        case .fast: return Self.essentialPasses
        }
    }
}

/// A GLSL compute shader to compile: a template text plus the defines that pick its variant.
public struct ShaderSource: Sendable, Hashable {
    /// A name for messages and dumps, e.g. `flex_attention_fwd`.
    public var name: String
    /// GLSL text starting with `#version`.
    public var text: String
    /// `#define NAME VALUE` lines inserted after `#version`, in this order.
    public var defines: [Define]
    /// The SPIR-V optimizer's recipe. `none` for shaders the optimizer must not see: spirv-opt
    /// from SPIRV-Tools v2023.1 segfaults on some NV cooperative-matrix shaders, taking the
    /// process down.
    public var optimization: SPIRVOptimization

    public struct Define: Sendable, Hashable {
        public var name: String
        public var value: String
        public init(_ name: String, _ value: String = "1") { self.name = name; self.value = value }
    }

    public init(name: String, text: String, defines: [Define] = [], optimization: SPIRVOptimization = .fast) {
        self.name = name
        self.text = text
        self.defines = defines
        self.optimization = optimization
    }

    /// The text shaderc sees: defines after the `#version` line, then `#line` so that messages
    /// keep the template's line numbers.
    public var expandedText: String {
        guard !defines.isEmpty else { return text }
        var lines = text.split(separator: "\n", omittingEmptySubsequences: false).map(String.init)
        let versionLine = lines.firstIndex { $0.hasPrefix("#version") } ?? -1
        let inject = defines.map { "#define \($0.name) \($0.value)" } + ["#line \(versionLine + 2)"]
        lines.insert(contentsOf: inject, at: versionLine + 1)
        return lines.joined(separator: "\n")
    }
}

/// The shader templates and includes: embedded in the binary from `Shaders/`, or read from the
/// folder `VKFLEX_SHADER_DIR` names (for working on shaders without rebuilding).
public struct ShaderLibrary: Sendable {
    /// File name (e.g. `flex_common.glsl`) to text.
    public var files: [String: String]

    public init(files: [String: String]) { self.files = files }

    /// The embedded copy, or the folder in `VKFLEX_SHADER_DIR` when that is set.
    public static var standard: ShaderLibrary {
        if let dir = ProcessInfo.processInfo.environment["VKFLEX_SHADER_DIR"], !dir.isEmpty,
           let names = try? FileManager.default.contentsOfDirectory(atPath: dir) {
            var files: [String: String] = [:]
            for name in names where name.hasSuffix(".comp") || name.hasSuffix(".glsl") {
                if let text = try? String(contentsOfFile: (dir as NSString).appendingPathComponent(name), encoding: .utf8) {
                    files[name] = text
                }
            }
            return ShaderLibrary(files: files)
        }
        return ShaderLibrary(files: EmbeddedShaders.files)
    }

    /// The text of a template or include.
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    public func text(_ name: String) throws -> String {
        guard let text = files[name] else {
            throw FlexError.invalidArgument("no shader named \(name) in the shader library (have: \(files.keys.sorted().joined(separator: ", ")))")
        }
        return text
    }
}

/// Compiles GLSL to SPIR-V with libshaderc, linked statically.
public final class ShaderCompiler: @unchecked Sendable {
    /// The process-wide compiler.
    public static let shared = ShaderCompiler()

    private let lock = NSLock()
    private var compiler: shaderc_compiler_t?
    private var compileCount = 0

    private init() {}

    /// How many compiles this process has asked for, from shaderc or the SPIR-V cache (for tests
    /// of the pipeline cache).
    public var compilations: Int { lock.withLock { compileCount } }

    /// Compiles `source` (with `#include` resolved from `library`) to SPIR-V words.
    ///
    /// `VKFLEX_DUMP_SHADERS=dir` first writes the source, its includes inlined, to
    /// `dir/<name>-<hash>.comp` (one file per variant; it compiles on its own with `glslc`); a
    /// device that rewrites cooperative-matrix modules to the KHR extension also writes what it
    /// gives the driver there (``CooperativeMatrixKHRRewriter/dump(_:name:to:)``).
    ///
    /// The SPIR-V is also kept on disk (next to the pipeline cache, see ``SPIRVCache``) under a
    /// hash of everything that decides it, so a second process skips shaderc for shaders it has
    /// seen — glslang and spirv-opt cost tens to hundreds of milliseconds on large kernels.
    ///
    /// - Throws: ``FlexError`` — ``FlexError/vulkan(call:result:)`` when a Vulkan call fails, ``FlexError/limitExceeded(_:)`` or ``FlexError/invalidArgument(_:)`` when a request is outside the device's limits or malformed.
    public func compile(_ source: ShaderSource, library: ShaderLibrary = .standard) throws -> [UInt32] {
        let mode = try SPIRVOptimization.forced() ?? source.optimization
        let text = source.expandedText
        if let dir = ProcessInfo.processInfo.environment["VKFLEX_DUMP_SHADERS"], !dir.isEmpty {
            try? FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
            let safe = String(source.name.map { $0.isLetter || $0.isNumber || $0 == "_" || $0 == "-" ? $0 : "_" })
            let standalone = Self.inliningIncludes(text, library: library)
            let tag = SPIRVCache.key(text: standalone, library: ShaderLibrary(files: [:]), optimization: mode).prefix(8)
            try? standalone.write(toFile: (dir as NSString).appendingPathComponent("\(safe)-\(tag).comp"), atomically: true, encoding: .utf8)
        }
        lock.withLock { compileCount += 1 }
        let cache = SPIRVCache.standard
        let key = cache.map { _ in SPIRVCache.key(text: text, library: library, optimization: mode) }
        if let cache, let key, let words = cache.load(key) { return words }
        var words = try compileWithShaderc(source, text: text, library: library, performance: mode == .full)
        if let passes = mode.passes { words = try Self.optimize(words, passes: passes, name: source.name) }
        if let cache, let key { cache.store(key, words) }
        return words
    }

    /// `text` with every `#include "name"` line replaced by that file of `library` (recursively,
    /// each file once), so a dumped shader compiles on its own with `glslc`.
    static func inliningIncludes(_ text: String, library: ShaderLibrary) -> String {
        var seen: Set<String> = []
        func expand(_ text: String) -> String {
            text.split(separator: "\n", omittingEmptySubsequences: false).map { line -> String in
                let trimmed = line.trimmingCharacters(in: .whitespaces)
                guard trimmed.hasPrefix("#include"), let open = trimmed.firstIndex(of: "\""),
                      let close = trimmed[trimmed.index(after: open)...].firstIndex(of: "\"") else { return String(line) }
                let name = String(trimmed[trimmed.index(after: open)..<close])
                guard let body = library.files[name] else { return String(line) }
                if !seen.insert(name).inserted { return "// \(name) (included above)" }
                return "// begin \(name)\n" + expand(body) + "\n// end \(name)"
            }.joined(separator: "\n")
        }
        return expand(text)
    }

    /// Runs SPIRV-Tools' optimizer with `passes` over `words`.
    static func optimize(_ words: [UInt32], passes: [String], name: String) throws -> [UInt32] {
        var out: UnsafeMutablePointer<UInt32>?
        var count = 0
        var message = [CChar](repeating: 0, count: 2048)
        let status = withCStrings(passes) { flags in
            words.withUnsafeBufferPointer { w in
                vkflex_spirv_optimize(w.baseAddress, w.count, flags.baseAddress, flags.count, &out, &count, &message, message.count)
            }
        }
        guard status == 0, let out else {
            let text = message.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
            throw FlexError.unsupported("spirv-opt failed on \(name): \(text)")
        }
        defer { vkflex_spirv_free(out) }
        return Array(UnsafeBufferPointer(start: out, count: count))
    }

    private func compileWithShaderc(_ source: ShaderSource, text: String, library: ShaderLibrary, performance: Bool) throws -> [UInt32] {
        try lock.withLock {
            if compiler == nil { compiler = shaderc_compiler_initialize() }
            guard let compiler else { throw FlexError.unsupported("shaderc_compiler_initialize failed") }
            guard let options = shaderc_compile_options_initialize() else {
                throw FlexError.unsupported("shaderc_compile_options_initialize failed")
            }
            defer { shaderc_compile_options_release(options) }
            shaderc_compile_options_set_target_env(options, shaderc_target_env_vulkan, UInt32((1 << 22) | (2 << 12)))
            shaderc_compile_options_set_target_spirv(options, shaderc_spirv_version_1_5)
            shaderc_compile_options_set_optimization_level(
                options, performance ? shaderc_optimization_level_performance : shaderc_optimization_level_zero)
            let names = Array(library.files.keys.sorted())
            let table = withCStrings(names) { np in
                withCStrings(names.map { library.files[$0]! }) { cp in
                    vkflex_include_table_create(np.baseAddress, cp.baseAddress, names.count)
                }
            }
            defer { vkflex_include_table_destroy(table) }
            vkflex_shaderc_use_includes(options, table)

            let fileName = source.name.hasSuffix(".comp") ? source.name : source.name + ".comp"
            let result = text.withCString { src in
                shaderc_compile_into_spv(compiler, src, strlen(src), shaderc_compute_shader, fileName, "main", options)
            }
            defer { shaderc_result_release(result) }
            let status = shaderc_result_get_compilation_status(result)
            guard status == shaderc_compilation_status_success else {
                let message = shaderc_result_get_error_message(result).map { String(cString: $0) } ?? "compilation failed (status \(status.rawValue))"
                throw FlexError.shaderCompile(ShaderCompileError.make(shaderName: source.name, fileName: fileName, message: message,
                                              text: source.text, library: library))
            }
            let length = shaderc_result_get_length(result)
            guard length % 4 == 0, length > 0, let bytes = shaderc_result_get_bytes(result) else {
                throw FlexError.unsupported("shaderc returned \(length) bytes of SPIR-V for \(source.name)")
            }
            return Array(UnsafeRawBufferPointer(start: bytes, count: length).bindMemory(to: UInt32.self))
        }
    }
}

extension ShaderCompileError {
    static func make(shaderName: String, fileName: String, message: String, text: String, library: ShaderLibrary) -> ShaderCompileError {
        // shaderc: "<file>:<line>: error: ..." — find the first such location.
        var file: String?
        var line: Int?
        for msgLine in message.split(separator: "\n") {
            let parts = msgLine.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
            if parts.count >= 3, let n = Int(parts[1].trimmingCharacters(in: .whitespaces)) {
                file = String(parts[0])
                line = n
                break
            }
        }
        var excerpt = ""
        if let line {
            let sourceText = (file == nil || file == fileName) ? text : (library.files[file!] ?? text)
            let lines = sourceText.split(separator: "\n", omittingEmptySubsequences: false)
            let lo = max(1, line - 4), hi = min(lines.count, line + 4)
            if lo <= hi {
                excerpt = (lo...hi).map { n in
                    let mark = n == line ? ">" : " "
                    let num = String(n)
                    return "\(mark) \(String(repeating: " ", count: max(0, 5 - num.count)))\(num) | \(lines[n - 1])"
                }.joined(separator: "\n")
            }
        }
        return ShaderCompileError(shaderName: shaderName, message: message, file: file, line: line, excerpt: excerpt)
    }
}

/// Compiled SPIR-V on disk, keyed by a 64-bit FNV-1a hash of the expanded source, every file of
/// the shader library (the generated mods included), the optimization choice and the vkflex
/// shaderc build. Lives in `$VKFLEX_CACHE_DIR`, `$XDG_CACHE_HOME/vkflex` or `~/.cache/vkflex`;
/// `VKFLEX_PIPELINE_CACHE=0` turns it off with the pipeline cache.
public struct SPIRVCache: Sendable {
    public let directory: URL

    public static var standard: SPIRVCache? {
        let env = ProcessInfo.processInfo.environment
        guard env["VKFLEX_PIPELINE_CACHE"] != "0" else { return nil }
        return SPIRVCache(directory: cacheRoot().appendingPathComponent("spirv"))
    }

    static func key(text: String, library: ShaderLibrary, optimization: SPIRVOptimization) -> String {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        func mix(_ s: String) {
            for b in s.utf8 { h = (h ^ UInt64(b)) &* 0x0000_0100_0000_01b3 }
            h = (h ^ 0xff) &* 0x0000_0100_0000_01b3
        }
        mix("vkflex-spirv-1 shaderc \(vkflex_shaderc_version()) opt=\(optimization.rawValue) \(optimization.passes ?? [])")
        mix(text)
        for name in library.files.keys.sorted() { mix(name); mix(library.files[name]!) }
        return String(format: "%016llx", h)
    }

    func load(_ key: String) -> [UInt32]? {
        guard let data = try? Data(contentsOf: directory.appendingPathComponent(key + ".spv")),
              data.count >= 20, data.count % 4 == 0 else { return nil }
        let words = data.withUnsafeBytes { Array($0.bindMemory(to: UInt32.self)) }
        return words.first == 0x0723_0203 ? words : nil
    }

    func store(_ key: String, _ words: [UInt32]) {
        try? FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let data = words.withUnsafeBytes { Data($0) }
        try? data.write(to: directory.appendingPathComponent(key + ".spv"), options: .atomic)
    }
}

/// `$VKFLEX_CACHE_DIR`, else `$XDG_CACHE_HOME/vkflex`, else `~/.cache/vkflex`.
func cacheRoot() -> URL {
    let env = ProcessInfo.processInfo.environment
    if let d = env["VKFLEX_CACHE_DIR"], !d.isEmpty { return URL(fileURLWithPath: d) }
    if let d = env["XDG_CACHE_HOME"], !d.isEmpty { return URL(fileURLWithPath: d).appendingPathComponent("vkflex") }
    return URL(fileURLWithPath: NSHomeDirectory()).appendingPathComponent(".cache/vkflex")
}
