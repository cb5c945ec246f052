import Foundation
import VKFlexTestSupport
import XCTest
import VKFlexVulkan
@testable import VKFlexSPIRV

/// The NV → KHR cooperative-matrix rewrite. lavapipe has neither extension, so these tests check
/// the SPIR-V the rewrite produces; the H200 runs it (docs/performance.md).
final class CooperativeMatrixKHRTests: VulkanTestCase {
    struct Parsed {
        var instructions: [(op: UInt32, w: [UInt32])] = []
        var uses: [UInt32: UInt32] = [:]        // KHR matrix type -> use
        var typeOf: [UInt32: UInt32] = [:]
        func count(_ op: UInt32) -> Int { instructions.filter { $0.op == op }.count }
    }

    func parse(_ words: [UInt32]) throws -> Parsed {
        var p = Parsed()
        var constants: [UInt32: UInt32] = [:]
        for ins in try CooperativeMatrixKHRRewriter.parse(words) {
            p.instructions.append((ins.op, ins.w))
            if ins.op == 43, ins.w.count == 3 { constants[ins.w[1]] = ins.w[2] }
            if ins.op == 4456 { p.uses[ins.w[0]] = constants[ins.w[5]] }
            if CooperativeMatrixKHRRewriter.resultLayout(ins.op).type, ins.w.count >= 2 { p.typeOf[ins.w[1]] = ins.w[0] }
        }
        return p
    }

    func compile(_ name: String, globals: String = "", optimization: SPIRVOptimization = .full, _ body: String) throws -> [UInt32] {
        let text = """
        #version 450
        #extension GL_NV_cooperative_matrix : require
        #extension GL_KHR_memory_scope_semantics : require
        #extension GL_EXT_shader_explicit_arithmetic_types_float16 : require
        layout(local_size_x = 32) in;
        layout(std430, binding = 0) buffer B { float16_t h[]; };
        layout(std430, binding = 1) buffer F { float f[]; };
        \(globals)
        void main() {
        \(body)
        }
        """
        return try ShaderCompiler.shared.compile(ShaderSource(name: name, text: text, optimization: optimization))
    }

    /// Q·Kᵀ then P·V, as the attention kernel does: K and V load as B operands, Q and P as A,
    /// S and O are accumulators, and P (an accumulator rounded to fp16) is converted element by
    /// element at the same indices.
    func testProductsGetTheirUsesAndAccumulatorToOperandIsLowered() throws {
        let nv = try compile("khr_attention_like", """
            fcoopmatNV<16, gl_ScopeSubgroup, 16, 16> q, k, v;
            coopMatLoadNV(q, h, 0, 16, false);
            coopMatLoadNV(k, h, 256, 16, true);
            coopMatLoadNV(v, h, 512, 16, false);
            fcoopmatNV<32, gl_ScopeSubgroup, 16, 16> s = fcoopmatNV<32, gl_ScopeSubgroup, 16, 16>(0.0);
            s = coopMatMulAddNV(q, k, s);
            for (int e = 0; e < s.length(); ++e) s[e] = exp(s[e]);
            fcoopmatNV<16, gl_ScopeSubgroup, 16, 16> p = fcoopmatNV<16, gl_ScopeSubgroup, 16, 16>(s);
            fcoopmatNV<32, gl_ScopeSubgroup, 16, 16> o = fcoopmatNV<32, gl_ScopeSubgroup, 16, 16>(0.0);
            o = coopMatMulAddNV(p, v, o);
            fcoopmatNV<16, gl_ScopeSubgroup, 16, 16> oh = fcoopmatNV<16, gl_ScopeSubgroup, 16, 16>(o);
            coopMatStoreNV(oh, h, 768, 16, false);
            coopMatStoreNV(o, f, 0, 16, false);
        """)
        XCTAssertTrue(CooperativeMatrixKHRRewriter.usesNVCooperativeMatrix(nv))
        let khr = try CooperativeMatrixKHRRewriter.rewrite(nv, subgroupSize: 32)
        XCTAssertFalse(CooperativeMatrixKHRRewriter.usesNVCooperativeMatrix(khr))
        let p = try parse(khr)
        XCTAssertEqual(p.count(4459), 2, "two products")
        XCTAssertEqual(p.count(5361) + p.count(5359) + p.count(5358), 0, "no NV instruction left")
        XCTAssertTrue(p.instructions.contains { $0.op == 17 && $0.w == [6022] }, "CooperativeMatrixKHR capability")
        for mul in p.instructions where mul.op == 4459 {
            XCTAssertEqual(mul.w.dropFirst(2).map { p.uses[p.typeOf[$0]!]! }, [0, 1, 2], "A, B, accumulator")
        }
        // Loads: Q row-major as A; K column-major and V row-major as B.
        let loads = p.instructions.filter { $0.op == 4457 }.map { p.uses[$0.w[0]]! }
        XCTAssertEqual(loads.sorted(), [0, 1, 1])
        // One conversion between uses (S -> P): 8 elements per invocation on a 32-wide subgroup,
        // each extracted, converted and inserted at the index it came from; O -> fp16 stays a
        // conversion within the accumulator use.
        let inserts = p.instructions.filter { $0.op == 82 && p.uses[$0.w[0]] != nil }
        XCTAssertEqual(inserts.map { $0.w[4] }, Array(0..<8))
        let extracts = p.instructions.filter { $0.op == 81 && p.typeOf[$0.w[2]].flatMap { p.uses[$0] } == 2 }
        XCTAssertTrue(extracts.map { $0.w[3] }.starts(with: Array(0..<8)), "\(extracts.map { $0.w })")
        let matrixConversions = p.instructions.filter { $0.op == 115 && p.uses[$0.w[0]] != nil }
        XCTAssertEqual(matrixConversions.map { p.uses[$0.w[0]]! }, [2], "O rounded to fp16 keeps its use")
        // The same for another subgroup size: 256 / 64 = 4 elements.
        let khr64 = try parse(CooperativeMatrixKHRRewriter.rewrite(nv, subgroupSize: 64))
        XCTAssertEqual(khr64.instructions.filter { $0.op == 82 && khr64.uses[$0.w[0]] != nil }.count, 4)
    }

    /// A matrix in a global (Private) variable takes the use of its products too (unoptimized
    /// SPIR-V, where the globals, function-local variables and the loop stay as written).
    func testGlobalMatrixVariables() throws {
        let nv = try compile("khr_global", globals: "fcoopmatNV<16, gl_ScopeSubgroup, 16, 16> gk;\nfcoopmatNV<32, gl_ScopeSubgroup, 16, 16> gc;",
                             optimization: .none, """
            fcoopmatNV<16, gl_ScopeSubgroup, 16, 16> q;
            coopMatLoadNV(q, h, 0, 16, false);
            coopMatLoadNV(gk, h, 256, 16, true);
            gc = fcoopmatNV<32, gl_ScopeSubgroup, 16, 16>(1.0);
            for (int i = 0; i < int(f[0]); ++i) gc = coopMatMulAddNV(q, gk, gc);
            coopMatStoreNV(gc, f, 0, 16, false);
        """)
        let p = try parse(try CooperativeMatrixKHRRewriter.rewrite(nv, subgroupSize: 32))
        XCTAssertEqual(p.count(4459), 1)
        // OpVariable ... Private (storage class 6) of matrix type: one per global.
        let globals = p.instructions.filter { $0.op == 59 && $0.w[2] == 6 }
        XCTAssertEqual(globals.count, 2, "the globals survive unoptimized")
        for mul in p.instructions where mul.op == 4459 {
            XCTAssertEqual(mul.w.dropFirst(2).map { p.uses[p.typeOf[$0]!]! }, [0, 1, 2])
        }
    }

    /// `VKFLEX_DUMP_SHADERS` also gets the module the driver is given.
    func testRewrittenModulesCanBeDumped() throws {
        let source = ShaderSource(name: "coopmat_layout", text: try ShaderLibrary.standard.text("coopmat_layout.comp"), defines: [.init("NARROW", "0")])
        let khr = try CooperativeMatrixKHRRewriter.rewrite(try ShaderCompiler.shared.compile(source), subgroupSize: 32)
        let dir = FileManager.default.temporaryDirectory.appendingPathComponent("vkflex-khr-dump-\(UUID())").path
        let path = try XCTUnwrap(CooperativeMatrixKHRRewriter.dump(khr, name: "coopmat layout", to: dir))
        XCTAssertTrue(path.hasSuffix(".khr.spv") && path.contains("/coopmat_layout-"), path)
        let back = try Data(contentsOf: URL(fileURLWithPath: path)).withUnsafeBytes { Array($0.bindMemory(to: UInt32.self)) }
        XCTAssertEqual(back, khr)
        XCTAssertEqual(CooperativeMatrixKHRRewriter.dump(khr, name: "coopmat layout", to: dir), path, "same module, same file")
    }

    func testAMatrixInTwoRolesIsRefused() throws {
        let nv = try compile("khr_two_roles", """
            fcoopmatNV<16, gl_ScopeSubgroup, 16, 16> x;
            coopMatLoadNV(x, h, 0, 16, false);
            fcoopmatNV<32, gl_ScopeSubgroup, 16, 16> c = fcoopmatNV<32, gl_ScopeSubgroup, 16, 16>(0.0);
            c = coopMatMulAddNV(x, x, c);
            coopMatStoreNV(c, f, 0, 16, false);
        """)
        XCTAssertThrowsError(try CooperativeMatrixKHRRewriter.rewrite(nv, subgroupSize: 32)) { error in
            XCTAssertTrue("\(error)".contains("both as A and as B"), "\(error)")
        }
        XCTAssertThrowsError(try CooperativeMatrixKHRRewriter.rewrite([1, 2, 3], subgroupSize: 32))
        // A module without cooperative matrices comes back unchanged.
        let plain = try ShaderCompiler.shared.compile(ShaderSource(name: "khr_plain", text: "#version 450\nlayout(local_size_x = 1) in;\nlayout(std430, binding = 0) buffer B { float x[]; };\nvoid main() { x[0] = 1.0; }\n"))
        XCTAssertEqual(try CooperativeMatrixKHRRewriter.rewrite(plain, subgroupSize: 32), plain)
    }

    /// The layout probe's matrices: fp32 ones are accumulators and the first fp16 one an A
    /// operand — the two layouts the kernel relies on (and the element-wise conversion between
    /// them needs to agree) — and the second fp16 one a B operand, fixed by a product.
    func testUnconstrainedMatricesTakeTheKernelsUses() throws {
        let source = ShaderSource(name: "coopmat_layout", text: try ShaderLibrary.standard.text("coopmat_layout.comp"), defines: [.init("NARROW", "1")])
        let p = try parse(CooperativeMatrixKHRRewriter.rewrite(try ShaderCompiler.shared.compile(source), subgroupSize: 32))
        let loads = p.instructions.filter { $0.op == 4457 }
        XCTAssertEqual(loads.count, 4)
        var byComponent: [UInt32: Set<UInt32>] = [:]
        for ins in p.instructions where ins.op == 4456 { byComponent[ins.w[1], default: []].insert(p.uses[ins.w[0]]!) }
        let widths = Dictionary(uniqueKeysWithValues: p.instructions.filter { $0.op == 22 }.map { ($0.w[0], $0.w[1]) })
        for (component, uses) in byComponent { XCTAssertEqual(uses, widths[component] == 32 ? [2] : [0, 1]) }
        // The probe measures the bfloat16 A operand's layout too: retyped, as the device builds it.
        let plain = ShaderSource(name: "coopmat_layout", text: source.text, defines: [.init("NARROW", "0")])
        let bf16 = try parse(BFloat16Retyper.retype(CooperativeMatrixKHRRewriter.rewrite(try ShaderCompiler.shared.compile(plain), subgroupSize: 32)))
        XCTAssertEqual(bf16.instructions.filter { $0.op == 22 && $0.w[1] == 16 }.map { $0.w.count }, [3], "one 16-bit float, encoded")
    }


    /// bfloat16 operands: the 16-bit float is declared BFloat16KHR, its constants re-encoded, the
    /// capabilities swapped; a module that computes with a 16-bit float is refused, naming it.
    func testBFloat16RetypeDeclaresAndRefusesArithmetic() throws {
        let moves = try compile("bf16_moves", """
            fcoopmatNV<16, gl_ScopeSubgroup, 16, 16> a = fcoopmatNV<16, gl_ScopeSubgroup, 16, 16>(float16_t(1.5)), b;
            coopMatLoadNV(b, h, 0, 16, true);
            fcoopmatNV<32, gl_ScopeSubgroup, 16, 16> c = fcoopmatNV<32, gl_ScopeSubgroup, 16, 16>(0.0);
            c = coopMatMulAddNV(a, b, c);
            coopMatStoreNV(c, f, 0, 16, false);
            h[0] = float16_t(f[1]);
        """)
        let bf16 = try BFloat16Retyper.retype(try CooperativeMatrixKHRRewriter.rewrite(moves, subgroupSize: 32))
        let p = try parse(bf16)
        let floats = p.instructions.filter { $0.op == 22 && $0.w[1] == 16 }
        XCTAssertEqual(floats.map(\.w), [[floats[0].w[0], 16, 0]])
        let halfConstants = p.instructions.filter { $0.op == 43 && $0.w[0] == floats[0].w[0] }.map { $0.w[2] }
        XCTAssertEqual(halfConstants, [0x3FC0], "1.5 as a bfloat16")
        let capabilities = Set(p.instructions.filter { $0.op == 17 }.map { $0.w[0] })
        XCTAssertTrue(capabilities.isSuperset(of: [5116, 5118]) && !capabilities.contains(9), "\(capabilities)")
        try CooperativeMatrixKHRRewriter.verify(bf16)

        let arithmetic = try compile("bf16_arithmetic", """
            fcoopmatNV<16, gl_ScopeSubgroup, 16, 16> a, b;
            coopMatLoadNV(a, h, 0, 16, false);
            coopMatLoadNV(b, h, 256, 16, true);
            fcoopmatNV<32, gl_ScopeSubgroup, 16, 16> c = fcoopmatNV<32, gl_ScopeSubgroup, 16, 16>(0.0);
            c = coopMatMulAddNV(a, b, c);
            coopMatStoreNV(c, f, 0, 16, false);
            h[1] = h[2] * h[3];
        """)
        XCTAssertThrowsError(try BFloat16Retyper.retype(try CooperativeMatrixKHRRewriter.rewrite(arithmetic, subgroupSize: 32))) { error in
            XCTAssertTrue("\(error)".contains("computes a 16-bit float"), "\(error)")
        }
        XCTAssertThrowsError(try BFloat16Retyper.retype(moves)) { error in
            XCTAssertTrue("\(error)".contains("NV cooperative matrices"), "\(error)")
        }
        XCTAssertEqual(Float(1 + 0x1p-8).bfloat16Bits, 0x3F80, "ties to even")
        XCTAssertEqual(Float(1 + 0x1p-8 + 0x1p-9).bfloat16Bits, 0x3F81)
        XCTAssertEqual(Float.greatestFiniteMagnitude.bfloat16Bits, 0x7F80, "overflow to inf")
    }
}
