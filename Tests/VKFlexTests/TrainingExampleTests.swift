import Foundation
import XCTest
@testable import VKFlex

/// The training example of docs/guide.md ("Training"), run: a relative-position bias table
/// learnt by gradient descent through the captures' gradients. The guide's block must be the
/// text between the markers below, so that what the guide shows is what CI runs.
final class TrainingExampleTests: FlexTestCase {
    /// Returns the loss of every step.
    func trainingExample() throws -> [Double] {
        // guide:training begin
        let (H, L, D) = (2, 32, 16)
        func random(_ n: Int) -> [Float] { (0..<n).map { _ in Float.random(in: -1...1) } }
        let q = try device.tensor(random(H * L * D), shape: [1, H, L, D])
        let k = try device.tensor(random(H * L * D), shape: [1, H, L, D])
        let v = try device.tensor(random(H * L * D), shape: [1, H, L, D])
        // The target: attention with a hidden relative-position bias. The model: a table of zeros.
        let hidden = try device.tensor((0..<2 * L - 1).map { Float(2 * sin(Double($0) / 5)) }, shape: [2 * L - 1], name: "hidden")
        let table = try device.tensor([Float](repeating: 0, count: 2 * L - 1), shape: [2 * L - 1], name: "table")
        func relativeBias(_ t: Tensor) -> ScoreMod { ScoreMod { score, _, _, q, kv in score + t[q - kv + (L - 1)] } }
        let causal = try createBlockMask(MaskMod { _, _, q, kv in q >= kv }, B: 1, H: 1, qLen: L, kvLen: L, device: device)
        let target = try flexAttention(q, k, v, scoreMod: relativeBias(hidden), blockMask: causal).output.toArray()

        var losses: [Double] = []
        for _ in 0..<30 {
            let forward = try flexAttention(q, k, v, scoreMod: relativeBias(table), blockMask: causal, returnLSE: true)
            // loss = ½‖output − target‖², so dLoss/dOutput = output − target.
            let diff = zip(try forward.output.toArray(), target).map { $0 - $1 }
            losses.append(diff.reduce(0) { $0 + 0.5 * Double($1 * $1) })
            let grads = try forward.backward(gradOutput: try device.tensor(diff, shape: forward.output.shape), gradCaptures: [table])
            let step = try grads.gradient(of: table)!.toArray()
            try table.copy(from: zip(try table.toArray(), step).map { $0 - 0.2 * $1 })   // plain gradient descent
        }
        print("loss: \(losses.first!) -> \(losses.last!)")
        // guide:training end
        return losses
    }

    func testTheLossFalls() throws {
        let losses = try trainingExample()
        XCTAssertLessThan(losses.last!, 0.25 * losses.first!, "\(losses)")
        // Downhill (measured: no step up in 6 runs at this rate).
        XCTAssertLessThanOrEqual(zip(losses, losses.dropFirst()).filter { $1 > $0 }.count, 1, "\(losses)")
    }

    func testTheGuideShowsThisExample() throws {
        let root = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let source = try String(contentsOf: URL(fileURLWithPath: #filePath), encoding: .utf8)
        let body = source.components(separatedBy: "// guide:training begin\n")[1].components(separatedBy: "        // guide:training end")[0]
        let code = body.split(separator: "\n", omittingEmptySubsequences: false).map { $0.count >= 8 ? String($0.dropFirst(8)) : String($0) }
        let guide = try String(contentsOf: root.appendingPathComponent("docs/guide.md"), encoding: .utf8)
        XCTAssertTrue(guide.contains("```swift\n" + code.joined(separator: "\n") + "```"),
                      "docs/guide.md's Training example differs from TrainingExampleTests.trainingExample(); copy it over")
    }
}
