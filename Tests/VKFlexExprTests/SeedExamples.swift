import VKFlexExpr

/// Every seed example of the attention-gym notebook, as a Swift closure and as text, with the
/// captured tensors they need. Shared by the expression tests.
struct SeedExample {
    var name: String
    var score: ScoreMod?
    var mask: MaskMod?
    var scoreText: String?
    var maskText: String?
    var captures: [String: HostTensor] = [:]
}

enum Seeds {
    static let H = 4
    static let slopes = HostTensor(name: "alibi_bias", float32: (0..<4).map { Float(Foundation.exp2(-Double($0 + 1) * 8.0 / 4.0)) }, shape: [4])
    static let doc = HostTensor(name: "document_id", int32: (0..<64).map { Int32($0 < 16 ? 0 : $0 < 40 ? 1 : 2) }, shape: [64])
    // Jagged: 3 sequences of lengths 10, 30, 24 packed; offsets and the sequence of each token.
    static let offsets = HostTensor(name: "offsets", int32: [0, 10, 40, 64], shape: [4])
    static let seqIdx = HostTensor(name: "seq_idx", int32: (0..<64).map { Int32($0 < 10 ? 0 : $0 < 40 ? 1 : 2) }, shape: [64])
    // Flamingo: 12 text tokens, 3 images of 3 tokens each.
    static let imageBoundaries = HostTensor(name: "image_boundaries", int32: (0..<9).map { Int32($0 / 3) }, shape: [9])
    static let intervals = HostTensor(name: "intervals", int32: [0, 7, 1, 7, 7, 12], shape: [3, 2])

    static var all: [SeedExample] {
        let W = 8, WINDOW = 2, KW = 3, KH = 3, GRID = 8
        let slopes = Self.slopes, doc = Self.doc, offsets = Self.offsets, seqIdx = Self.seqIdx
        let imageBoundaries = Self.imageBoundaries, intervals = Self.intervals
        return [
            SeedExample(name: "noop", score: .identity, mask: noopMask, scoreText: "score", maskText: "True"),
            SeedExample(name: "causal", mask: MaskMod { _, _, q, kv in q >= kv }, maskText: "q_idx >= kv_idx"),
            SeedExample(name: "causal_bias", score: ScoreMod { s, _, _, q, kv in select(q >= kv, s, -Double.infinity) },
                        scoreText: "where(q_idx >= kv_idx, score, -inf)"),
            SeedExample(name: "sliding_window", mask: MaskMod { _, _, q, kv in (q >= kv) & (q - kv <= W) },
                        maskText: "(q_idx >= kv_idx) & (q_idx - kv_idx <= 8)"),
            SeedExample(name: "prefix_lm", mask: MaskMod { _, _, q, kv in (kv <= 20) | (q >= kv) },
                        maskText: "(kv_idx <= 20) | (q_idx >= kv_idx)"),
            SeedExample(name: "document", mask: MaskMod { _, _, q, kv in (q >= kv) & (doc[q] == doc[kv]) },
                        maskText: "(q_idx >= kv_idx) & (document_id[q_idx] == document_id[kv_idx])", captures: ["document_id": doc]),
            SeedExample(name: "sasa", mask: MaskMod { _, _, q, kv in
                (abs(floorDiv(q, GRID) - floorDiv(kv, GRID)) <= WINDOW) & (abs(q % GRID - kv % GRID) <= WINDOW)
            }, maskText: "(abs(q_idx // 8 - kv_idx // 8) <= 2) & (abs(q_idx % 8 - kv_idx % 8) <= 2)"),
            SeedExample(name: "natten", mask: MaskMod { _, _, q, kv in
                let qx = floorDiv(q, GRID), qy = q % GRID, kx = floorDiv(kv, GRID), ky = kv % GRID
                let cx = clamp(qx, KW / 2, (GRID - 1) - KW / 2), cy = clamp(qy, KH / 2, (GRID - 1) - KH / 2)
                return (abs(cx - kx) <= KW / 2) & (abs(cy - ky) <= KH / 2)
            }, maskText: "(abs(clamp(q_idx // 8, 1, 6) - kv_idx // 8) <= 1) & (abs(clamp(q_idx % 8, 1, 6) - kv_idx % 8) <= 1)"),
            SeedExample(name: "alibi", score: ScoreMod { s, _, h, q, kv in s + slopes[h] * (q - kv) },
                        scoreText: "score + alibi_bias[h] * (q_idx - kv_idx)", captures: ["alibi_bias": slopes]),
            SeedExample(name: "alibi_functional", score: ScoreMod { s, _, h, q, kv in s + (q - kv) * exp2(-((h + 1) * 8.0 / H)) },
                        scoreText: "score + (q_idx - kv_idx) * exp2(-((h + 1) * 8.0 / 4))"),
            SeedExample(name: "softcap", score: ScoreMod { s, _, _, _, _ in 20 * tanh(s / 20) }, scoreText: "20 * tanh(score / 20)"),
            SeedExample(name: "jagged_causal", mask: MaskMod { _, _, q, kv in
                let qn = q - offsets[seqIdx[q]], kn = kv - offsets[seqIdx[kv]]
                return (qn >= kn) & (seqIdx[q] == seqIdx[kv])
            }, maskText: "(q_idx - offsets[seq_idx[q_idx]] >= kv_idx - offsets[seq_idx[kv_idx]]) & (seq_idx[q_idx] == seq_idx[kv_idx])",
                        captures: ["offsets": offsets, "seq_idx": seqIdx]),
            SeedExample(name: "flamingo", mask: MaskMod { _, _, q, kv in
                let image = imageBoundaries[kv]
                return (q >= intervals[image, 0]) & (q < intervals[image, 1])
            }, maskText: "(q_idx >= intervals[image_boundaries[kv_idx], 0]) & (q_idx < intervals[image_boundaries[kv_idx]][1])",
                        captures: ["image_boundaries": imageBoundaries, "intervals": intervals]),
        ]
    }
}

import Foundation
