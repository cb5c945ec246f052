import Foundation
import VKFlexExpr
import VKFlexVulkan

/// The sizes of an attention call, validated.
struct AttentionShape {
    let B: Int, Hq: Int, Hkv: Int, Lq: Int, Lkv: Int, D: Int, Dv: Int
    let dtype: DType

    /// `queryOffsets`: the call places its query rows at offsets (`qOffset:`), so the BlockMask may
    /// cover more query positions than `Lq` (each offset's range is checked with its values).
    /// `pagedKeys`: K and V are physical paged caches `[1, Hkv, pages·pageSize, D]` read through a
    /// page table whose rows span this many logical keys (`Lkv`).
    init(_ q: Tensor, _ k: Tensor, _ v: Tensor, blockMask: BlockMask?, enableGQA: Bool, queryOffsets: Bool = false,
         pagedKeys: Int? = nil) throws {
        for (name, t) in [("query", q), ("key", k), ("value", v)] {
            guard t.rank == 4 else { throw FlexError("\(name) must be 4-D [B, H, L, D], got shape \(t.shape)") }
            guard t.dtype.isFloat else {
                throw FlexError("\(name) is \(t.dtype.rawValue); attention inputs must be float32, float16 or bfloat16")
            }
            guard t.device === q.device else { throw FlexError("\(name) is on another device than the query") }
        }
        guard q.dtype == k.dtype, q.dtype == v.dtype else {
            throw FlexError("query, key and value must share a dtype, got \(q.dtype.rawValue), \(k.dtype.rawValue), \(v.dtype.rawValue)")
        }
        B = q.shape[0]; Hq = q.shape[1]; Lq = q.shape[2]; D = q.shape[3]
        Hkv = k.shape[1]; Lkv = pagedKeys ?? k.shape[2]; Dv = v.shape[3]
        dtype = q.dtype
        if pagedKeys != nil {
            guard k.shape[0] == 1, v.shape[0] == 1 else {
                throw FlexError("paged K and V are physical caches [1, Hkv, pages·pageSize, D]; got key \(k.shape) and value \(v.shape)")
            }
        } else {
            guard k.shape[0] == B, v.shape[0] == B else {
                throw FlexError("batch sizes differ: query \(B), key \(k.shape[0]), value \(v.shape[0])")
            }
        }
        guard v.shape[1] == Hkv else { throw FlexError("key has \(Hkv) heads but value has \(v.shape[1])") }
        guard v.shape[2] == k.shape[2] else { throw FlexError("key has length \(k.shape[2]) but value has \(v.shape[2])") }
        guard k.shape[3] == D else { throw FlexError("query head dim \(D) differs from key head dim \(k.shape[3])") }
        guard (1...256).contains(D) else { throw FlexError("head dim \(D) is outside 1...256") }
        guard (1...256).contains(Dv) else { throw FlexError("value head dim \(Dv) is outside 1...256") }
        if Hq != Hkv {
            guard enableGQA else {
                throw FlexError("query has \(Hq) heads and key/value \(Hkv): pass enableGQA: true for grouped-query attention")
            }
            guard Hkv > 0, Hq % Hkv == 0 else {
                throw FlexError("enableGQA needs the query heads (\(Hq)) to be a multiple of the key/value heads (\(Hkv))")
            }
        }
        guard Hkv > 0 || Hq == 0 else { throw FlexError("key/value have no heads") }
        if q.dtype.size == 2 && !q.device.enabledFeatures.storageBuffer16Bit {
            throw FlexError.unsupported("\(q.device.capabilities.name) cannot read \(q.dtype.rawValue) buffers (no 16-bit storage); use float32")
        }
        if let m = blockMask {
            guard queryOffsets ? m.qLen >= Lq : m.qLen == Lq, m.kvLen == Lkv else {
                if queryOffsets {
                    throw FlexError("the BlockMask was built for qLen=\(m.qLen), kvLen=\(m.kvLen) but the inputs have \(Lq) query rows and kvLen=\(Lkv): with qOffset: build it for the whole sequence (qLen at least the last position + 1) and these keys")
                }
                throw FlexError("the BlockMask was built for qLen=\(m.qLen), kvLen=\(m.kvLen) but the inputs have qLen=\(Lq), kvLen=\(Lkv): build it for these lengths")
            }
            guard m.B == 1 || m.B == B else { throw FlexError("the BlockMask has B=\(m.B); it must be 1 (broadcast) or the batch size \(B)") }
            guard m.H == 1 || m.H == Hq else { throw FlexError("the BlockMask has H=\(m.H); it must be 1 (broadcast) or the number of query heads \(Hq)") }
            guard m.device === q.device else { throw FlexError("the BlockMask belongs to another device") }
        }
    }
}

/// The forward kernels (portable and cooperative-matrix): tile sizes, pipelines and dispatch.
/// Runs the forward pass: plans the call, builds (or finds) its pipeline, binds and dispatches.
enum ForwardKernel {
    /// A kernel built for a call: the pipeline, the mods it splices and its plan.
    struct Prepared {
        let pipeline: ComputePipeline
        let mods: SplicedMods
        let plan: AttentionPlan
        var BQ: Int { plan.BQ }
        var BKV: Int { plan.BKV }
        var WG: Int { plan.WG }
        /// The parameter block goes as push constants (else as a buffer at `AttentionBinding.params`).
        var pushParams: Bool { plan.pushParams }
    }

    /// Plans a call and builds (or finds in the caches) its pipeline. The plan is the cache key: the
    /// shader source is made only on a miss. Batch and heads do not enter it, nor lengths below
    /// 2^22 (see `AttentionPlan.floatIndices`).
    static func prepare(shape s: AttentionShape, scoreMod: ScoreMod?, blockMask: BlockMask?, scale: Double, kernel: FlexKernel,
                        device: Device, pass: AttentionPlan.Pass = .forward, maxScores: Bool = false, kvLengths: Bool = false,
                        sinks: Bool = false, qOffsets: Bool = false, paged: Bool = false, lse: Bool = false) throws -> Prepared {
        let mods = try SplicedMods(score: scoreMod.flatMap { $0.isIdentity ? nil : $0 }, mask: blockMask?.maskMod,
                                   firstBinding: AttentionBinding.firstCapture, errorBinding: AttentionBinding.errors.rawValue, device: device)
        let plan = try AttentionPlanner.forward(shape: s, mods: mods, scoreMod: scoreMod, blockMask: blockMask, scale: scale, kernel: kernel,
                                                device: device, pass: pass, maxScores: maxScores, kvLengths: kvLengths, sinks: sinks,
                                                qOffsets: qOffsets, paged: paged, lse: lse)
        let pipeline = try device.pipeline(for: plan) {
            PipelineDescription(source: try plan.source(), bindingCount: AttentionBinding.firstCapture + mods.tensors.count,
                                pushConstantSize: plan.pushParams ? AttentionParams.byteCount : 0, includes: mods.includes,
                                cooperativeMatrixKHR: plan.typedOperands, bfloat16Operands: plan.bfloat16Operands)
        }
        return Prepared(pipeline: pipeline, mods: mods, plan: plan)
    }

    static func run(shape s: AttentionShape, q: Tensor, k: Tensor, v: Tensor, scoreMod: ScoreMod?, blockMask: BlockMask?,
                    scale: Double, output: Tensor, lse: Tensor?, maxScores: Tensor? = nil, kvLengths: Tensor? = nil, sinks: Tensor? = nil,
                    qOffsets: ResolvedQueryOffsets? = nil, paging: ResolvedPaging? = nil, kernel: FlexKernel) throws -> FlexKernel {
        let device = q.device
        let caps = device.capabilities
        // Split-KV decoding: whether K and V allow the NVIDIA-layout kernel's 16-row matrix loads.
        let nvInputs = kernel == .splitKV
            ? AttentionPlanner.decodeNVInputs(k: k, v: v, Lkv: s.Lkv, kvBlockSize: blockMask?.blockSize.kv, pageSize: paging?.pageSize) : nil
        let prepared = try AttentionPlanner.$decodeNVInputs.withValue(nvInputs) {
            try prepare(shape: s, scoreMod: scoreMod, blockMask: blockMask, scale: scale, kernel: kernel, device: device,
                        maxScores: maxScores != nil, kvLengths: kvLengths != nil, sinks: sinks != nil, qOffsets: qOffsets != nil,
                        paged: paging != nil, lse: lse != nil)
        }
        let (pipeline, mods, BQ, BKV) = (prepared.pipeline, prepared.mods, prepared.BQ, prepared.BKV)

        // Block structure: the mask's, or a dense walk.
        let qBS: Int, kvBS: Int, qBlocks: Int, kvBlocks: Int, maskB: Int, maskH: Int
        let maskBuffers: [Tensor]
        if let m = blockMask {
            qBS = m.blockSize.q; kvBS = m.blockSize.kv; qBlocks = m.qBlocks; kvBlocks = m.kvBlocks; maskB = m.B; maskH = m.H
            maskBuffers = [m.kvNumBlocks, m.kvIndices, m.fullKVNumBlocks, m.fullKVIndices]
        } else {
            qBS = BQ; kvBS = BKV * 8; qBlocks = (s.Lq + BQ - 1) / BQ; kvBlocks = (s.Lkv + kvBS - 1) / kvBS; maskB = 1; maskH = 1
            let dummy = try dummyIndexBuffer(device)
            maskBuffers = [dummy, dummy, dummy, dummy]
        }
        let tilesPerBlock = (qBS + BQ - 1) / BQ
        // With query offsets the tiles of each batch start at the block of its first position: the
        // grid covers the batch whose rows span the most blocks.
        let groupsX = (qOffsets?.values.map { ($0 + s.Lq - 1) / qBS - $0 / qBS + 1 }.max() ?? qBlocks) * tilesPerBlock
        guard groupsX <= caps.maxWorkgroupCount[0], s.Hq <= caps.maxWorkgroupCount[1] else {
            throw FlexError.limitExceeded("\(groupsX) query tiles x \(s.Hq) heads exceed the device's dispatch limits")
        }
        let lseScratch = lse == nil ? try dummyFloatBuffer(device) : nil
        let unusedMax = maxScores == nil ? try dummyFloatBuffer(device) : nil   // binding 11 without max scores

        // Split over batches, then heads, when a tensor spans more than one storage-buffer binding.
        let chunks = try planChunks(s, q: q, k: k, v: v, output: output, lse: lse, device: device)
        if kernel == .splitKV, !chunks.allSatisfy({ $0.h == 0..<s.Hq }) {
            // The decode kernel packs every head of a KV head's group: chunks split by batch only.
            return try run(shape: s, q: q, k: k, v: v, scoreMod: scoreMod, blockMask: blockMask, scale: scale, output: output, lse: lse,
                           maxScores: maxScores, kvLengths: kvLengths, sinks: sinks, qOffsets: qOffsets, paging: paging, kernel: .portable)
        }
        let group = s.Hq / max(1, s.Hkv)
        let (errors, errorCheck) = try errorFlag(mods: mods, scoreMod: scoreMod, blockMask: blockMask, device: device)
        let unusedParams = prepared.pushParams ? try dummyFloatBuffer(device) : nil   // binding 9 with push constants
        // Where the driver caps a shader's loop iterations, the key blocks are walked a share per
        // dispatch into float32 partials, which a merge pass combines by their LSEs.
        let kvSplit = kernel == .portable || kernel == .coopmatGeneric
            ? kvBlocksPerDispatch(shape: s, plan: prepared.plan, kvBlockSize: kvBS, kvBlocks: kvBlocks, device: device) : nil
        let splits = kvSplit.map { (kvBlocks + $0 - 1) / $0 } ?? 1
        let partial = splits > 1
            ? try prepare(shape: s, scoreMod: scoreMod, blockMask: blockMask, scale: scale, kernel: kernel, device: device,
                          pass: .forwardPartial, maxScores: maxScores != nil, kvLengths: kvLengths != nil, qOffsets: qOffsets != nil,
                          paged: paging != nil) : nil

        /// `split`: (splits, KV blocks per split, partial O stride, partial LSE stride) of a split dispatch.
        /// `groups`: the grid, where not the prefill kernels'; `decode`: the decode kernel's packing.
        func dispatch(_ pipeline: ComputePipeline, chunk: Chunk, out: WriteTarget, lse lseTarget: WriteTarget?, max maxTarget: WriteTarget?,
                      kvRange: Range<Int>, split: (count: Int, blocks: Int, oStride: Int, lseStride: Int) = (1, 0, 0, 0),
                      groups: (x: Int, y: Int, z: Int)? = nil, decode: (chunksPerHead: Int, chunks: Int, segs: Int) = (0, 1, 1)) throws {
            // The maximum scores are addressed like the LSE (both [B, Hq, Lq], contiguous, made here).
            precondition(lseTarget == nil || maxTarget == nil || (lseTarget!.base == maxTarget!.base && lseTarget!.strides == maxTarget!.strides))
            let rowTarget = lseTarget ?? maxTarget
            let (b0, nb, h0, nh) = (chunk.b.lowerBound, chunk.b.count, chunk.h.lowerBound, chunk.h.count)
            let kvHeads = (h0 / group)..<((h0 + nh - 1) / group + 1)
            var slots: [AttentionBinding: BufferBinding] = [:]
            var p = AttentionParams()
            for (slot, t, heads, prefix) in [(AttentionBinding.q, q, chunk.h, "q"), (.k, k, kvHeads, "k"), (.v, v, kvHeads, "v")] {
                let (binding, base) = try bind(t, batches: chunk.b, heads: heads, writes: false, device: device)
                slots[slot] = binding
                p.setLayout(prefix, base: base, strides: t.strides)
            }
            slots[.output] = out.binding
            p.setLayout("o", base: out.base, strides: out.strides)
            slots[.lse] = lseTarget?.binding ?? BufferBinding(lseScratch!, writes: true)
            p.setLayout("lse", base: rowTarget?.base ?? 0, strides: rowTarget?.strides ?? [0, 0, 0])
            for (slot, t) in zip([AttentionBinding.kvNum, .kvIndices, .fullKVNum, .fullKVIndices], maskBuffers) {
                slots[slot] = t.binding()
            }
            p.set([.B: s.B, .Hq: s.Hq, .Hkv: s.Hkv, .Lq: s.Lq, .Lkv: s.Lkv, .b_start: b0,
                   .mask_b: maskB, .mask_h: maskH, .q_bs: qBS, .kv_bs: kvBS, .q_blocks: qBlocks, .kv_blocks: kvBlocks,
                   .dense: blockMask == nil ? 1 : 0, .tiles_per_block: tilesPerBlock, .write_lse: lseTarget == nil ? 0 : 1])
            p.set(.scale, float: Float(scale))
            // Rows readable 8 halves at a time: unit inner stride, 8-aligned row offsets.
            let strides = [q.strides, k.strides, v.strides, out.strides]
            let bases = [AttentionField.q_base, .k_base, .v_base, .o_base].map { p.int($0) }
            let vecOK = (0..<4).allSatisfy { i in
                strides[i][3] == 1 && bases[i] % 8 == 0 && strides[i][0] % 8 == 0 && strides[i][1] % 8 == 0 && strides[i][2] % 8 == 0
            } && s.D % 8 == 0 && s.Dv % 8 == 0
            p.set([.vec_ok: vecOK ? 1 : 0, .h_start: h0, .hk_start: kvHeads.lowerBound, .kv_block_lo: kvRange.lowerBound,
                   .kv_block_hi: kvRange.upperBound, .write_max: maxTarget == nil ? 0 : 1,
                   .splits: split.count, .kv_split_blocks: split.blocks, .o_split_stride: split.oStride, .lse_split_stride: split.lseStride,
                   .page_size: paging?.pageSize ?? 0, .max_pages: paging?.maxPages ?? 0,
                   .dec_cph: decode.chunksPerHead, .dec_chunks: decode.chunks, .dec_segs: decode.segs])
            let params = p.bytes()
            if let unusedParams {
                slots[.params] = BufferBinding(unusedParams)
            } else {
                let paramBuffer = try device.makeBuffer(bytes: params.count)
                try paramBuffer.upload(params)
                slots[.params] = BufferBinding(paramBuffer)
            }
            slots[.errors] = BufferBinding(errors, writes: true)
            slots[.maxScores] = maxTarget?.binding ?? BufferBinding(unusedMax!, writes: true)
            slots[.kvLengths] = try (kvLengths ?? dummyIndexBuffer(device)).binding()
            slots[.sinks] = try (sinks ?? dummyIndexBuffer(device)).binding()
            slots[.qOffsets] = try (qOffsets?.tensor ?? dummyIndexBuffer(device)).binding()
            slots[.pageTable] = try (paging?.table ?? dummyIndexBuffer(device)).binding()
            let bindings = AttentionBinding.allCases.map { slots[$0]! } + mods.captureBindings()
            try device.record { rec in
                try rec.dispatch(pipeline, bindings: bindings, pushConstants: prepared.pushParams ? params : [], groups: groups ?? (groupsX, nh, nb * split.count))
            }
        }

        /// The part of an output tensor (O, LSE, max scores) a chunk writes.
        func writeTarget(_ t: Tensor, _ chunk: Chunk) throws -> WriteTarget {
            let (binding, base) = try bind(t, batches: chunk.b, heads: chunk.h, writes: true, device: device)
            return WriteTarget(binding: binding, base: base, strides: t.strides)
        }
        if kernel == .splitKV {
            // Split-KV decoding: each workgroup holds a chunk of one KV head's (query head, query row)
            // pairs (of one head under a per-head mask) whose positions lie in one query block of the
            // mask (`segs` of them at most), and walks one split's share of that block row's kept blocks.
            let perHead = (blockMask?.H ?? 1) > 1
            // Chunks of BQ (the plan's rows per workgroup) of the group's (head, query row) pairs:
            // consecutive pairs under a broadcast mask, one head's query rows under a per-head mask.
            let chunksPerHead = perHead ? (s.Lq + BQ - 1) / BQ : 0
            let headChunks = perHead ? group * chunksPerHead : (group * s.Lq + BQ - 1) / BQ
            let segs = (qOffsets?.values ?? [0]).map { ($0 + s.Lq - 1) / qBS - $0 / qBS + 1 }.max()!
            for chunk in chunks {
                let nb = chunk.b.count, workgroups = nb * s.Hkv * headChunks * segs
                // One wave of what a compute unit holds (decodeWantedSplits; VKFLEX_DECODE_WAVES the older
                // rule), no more splits than key blocks; under a loop cap (lavapipe), enough splits that each stays under it.
                // The matrix kernel with several subgroups a workgroup: each walks a split of its own.
                let tuning = try AttentionTuning.of(device)
                var nsg = 1, nvLayout = false
                if case .decodeMM(let t) = prepared.plan.tiles { nsg = t.NSG; nvLayout = t.nvDecode }
                let wanted = AttentionPlanner.decodeWantedSplits(workgroups: workgroups, computeUnits: caps.computeUnits ?? 32,
                                                                 workgroupSize: prepared.plan.WG, subgroups: nsg, nvidiaLayout: nvLayout,
                                                                 waves: tuning.decodeWaves, kvBlocks: kvBlocks)
                var splits = tuning.decodeSplits.map { max(1, min(kvBlocks, $0)) }
                    ?? AttentionPlanner.decodeSplits(wanted: wanted, kvBlocks: kvBlocks,
                                                     partialBytesPerSplit: nb * s.Hq * s.Lq * s.Dv * 4, subgroups: nsg)
                if let limit = loopIterationLimit(device), !ignoreLoopLimitForTesting {
                    let perBlock = decodeIterationsPerBlock(D: s.D, Dv: s.Dv, kvBlockSize: kvBS, plan: prepared.plan, half: s.dtype.size == 2)
                    // Outside the walk: Q, the merge of the key slots and subgroups (the cursor jumps to its share: no walk over the list).
                    let budget = limit * 3 / 4 - (BQ * s.D + 4 * BQ * s.Dv + 512)
                    let blocksPerSplit = max(1, budget / perBlock)
                    splits = max(splits, (kvBlocks + blocksPerSplit - 1) / blocksPerSplit)
                    // The merge's loops over the splits run fewer than three times their count.
                    guard 3 * splits + 64 <= limit * 3 / 4 else {
                        throw FlexError.limitExceeded("\(caps.name) stops a shader's loops after \(limit) iterations: \(kvBlocks) KV blocks of \(kvBS) keys need \(splits) key splits, more than its merge can combine; use larger KV blocks")
                    }
                }
                splits = (splits + nsg - 1) / nsg * nsg   // whole workgroups
                let rows = nb * s.Hq * s.Lq, partBytes = splits * rows * s.Dv * 4
                guard partBytes <= caps.maxStorageBufferRange, splits / nsg <= caps.maxWorkgroupCount[0],
                      s.Hkv * headChunks * segs <= caps.maxWorkgroupCount[1], nb <= caps.maxWorkgroupCount[2] else {
                    throw FlexError.limitExceeded("split-kv: \(splits) key splits of \(rows) rows exceed \(caps.name)'s limits; pass fewer batches per call")
                }
                let partO = try device.makeBuffer(bytes: max(16, partBytes)), partL = try device.makeBuffer(bytes: max(16, splits * rows * 4))
                let partM = maxScores == nil ? nil : try device.makeBuffer(bytes: max(16, splits * rows * 4))
                let rowStrides = [s.Hq * s.Lq, s.Lq, 1]
                try dispatch(pipeline, chunk: chunk,
                             out: WriteTarget(binding: BufferBinding(partO, writes: true), base: 0, strides: [s.Hq * s.Lq * s.Dv, s.Lq * s.Dv, s.Dv, 1]),
                             lse: WriteTarget(binding: BufferBinding(partL, writes: true), base: 0, strides: rowStrides),
                             max: partM.map { WriteTarget(binding: BufferBinding($0, writes: true), base: 0, strides: rowStrides) },
                             kvRange: 0..<kvBlocks, split: (splits, 0, rows * s.Dv, rows),
                             groups: (splits / nsg, s.Hkv * headChunks * segs, nb), decode: (chunksPerHead, headChunks, segs))
                func target(_ t: Tensor) throws -> WriteTarget { try writeTarget(t, chunk) }
                try merge(splits: splits, partO: partO, partL: partL, partMax: partM, nb: nb, nh: s.Hq, shape: s, out: try target(output),
                          lse: try lse.map(target), max: try maxScores.map(target), sinks: sinks, headStart: 0, outDType: output.dtype, device: device)
            }
            addChecks(errorCheck, blockMask: blockMask, to: [output, lse, maxScores])
            return .splitKV
        }
        for chunk in chunks {
            func target(_ t: Tensor) throws -> WriteTarget { try writeTarget(t, chunk) }
            let outTarget = try target(output), lseTarget = try lse.map(target), maxTarget = try maxScores.map(target)
            guard let partial, let perSplit = kvSplit else {
                try dispatch(pipeline, chunk: chunk, out: outTarget, lse: lseTarget, max: maxTarget, kvRange: 0..<kvBlocks)
                continue
            }
            // Partials: O [split, b, h, i, d] and LSE [split, b, h, i], float32, contiguous.
            let (nb, nh) = (chunk.b.count, chunk.h.count)
            let rows = nb * nh * s.Lq
            let partBytes = splits * rows * s.Dv * 4
            guard partBytes <= caps.maxStorageBufferRange else {
                throw FlexError.limitExceeded("\(caps.name) stops a shader's loops after 65535 iterations, so \(s.Lkv) keys are walked in \(splits) passes whose partial outputs (\(formatBytes(partBytes))) exceed what it binds per buffer (\(formatBytes(caps.maxStorageBufferRange))); pass fewer query rows or heads per call")
            }
            let partO = try device.makeBuffer(bytes: max(16, partBytes)), partL = try device.makeBuffer(bytes: max(16, splits * rows * 4))
            let partM = maxScores == nil ? nil : try device.makeBuffer(bytes: max(16, splits * rows * 4))
            // One dispatch: the splits run side by side (workgroup z = batch × splits + split).
            guard nb * splits <= caps.maxWorkgroupCount[2] else {
                throw FlexError.limitExceeded("\(nb) batches x \(splits) key splits exceed the device's dispatch limit (\(caps.maxWorkgroupCount[2])); pass fewer batches per call")
            }
            try dispatch(partial.pipeline, chunk: chunk,
                         out: WriteTarget(binding: BufferBinding(partO, writes: true), base: 0, strides: [nh * s.Lq * s.Dv, s.Lq * s.Dv, s.Dv, 1]),
                         lse: WriteTarget(binding: BufferBinding(partL, writes: true), base: 0, strides: [nh * s.Lq, s.Lq, 1]),
                         max: partM.map { WriteTarget(binding: BufferBinding($0, writes: true), base: 0, strides: [nh * s.Lq, s.Lq, 1]) },
                         kvRange: 0..<kvBlocks, split: (splits, perSplit, rows * s.Dv, rows))
            try merge(splits: splits, partO: partO, partL: partL, partMax: partM, nb: nb, nh: nh, shape: s, out: outTarget, lse: lseTarget,
                      max: maxTarget, sinks: sinks, headStart: chunk.h.lowerBound, outDType: output.dtype, device: device)
        }
        addChecks(errorCheck, blockMask: blockMask, to: [output, lse, maxScores])
        return kernel
    }

    /// An upper bound of the decode kernel's loop iterations per KV block (every loop of
    /// flex_attention_decode.comp counted as if none were unrolled).
    static func decodeIterationsPerBlock(D: Int, Dv: Int, kvBlockSize: Int, plan: AttentionPlan, half: Bool) -> Int {
        func ceilDiv(_ a: Int, _ b: Int) -> Int { (a + b - 1) / b }
        if case .decodeMM(let t) = plan.tiles {
            // The matrix kernel's steps are the generic forward's key tiles for one subgroup (and at
            // most kvBlockSize keys each).
            return ceilDiv(kvBlockSize, t.BKV) * (genericIterationsPerTile(D: D, Dv: Dv, tiles: t) + 4) + 4
        }
        guard case .decode(let R, let KPL, let WG, let LK, _, _) = plan.tiles else { preconditionFailure("decode bound without decode tiles") }
        let unit = half ? 8 : 4, upl = ceilDiv(ceilDiv(D, unit), LK), vpl = ceilDiv(ceilDiv(Dv, unit), LK)
        var log2LK = 0
        while 1 << log2LK < LK { log2LK += 1 }
        // Per key: loading (element by element at worst), the dot products, the butterfly, and per row the softmax and P·V.
        let load = KPL * (upl + vpl) * (1 + unit)
        let perKey = upl * (1 + R * (1 + unit)) + log2LK * (1 + R) + vpl * (1 + unit) + R * (3 + 2 * vpl * (1 + unit))
        let rounds = ceilDiv(kvBlockSize, KPL * WG / LK)
        return rounds * (2 + load + KPL * (1 + perKey)) + 4
    }

    /// A call's error flag: a zeroed one of its own where it will be read (a mod that can fail, or
    /// a driver that caps loops, where a walk may stop early), else the shared stand-in, which the
    /// kernel then never writes.
    static func errorFlag(mods: SplicedMods, scoreMod: ScoreMod?, blockMask: BlockMask?, device: Device) throws -> (Buffer, ErrorCheck?) {
        let read = (scoreMod?.graph.canFail ?? false) || (blockMask?.maskMod?.graph.canFail ?? false) || loopIterationLimit(device) != nil
        guard read else { return (try dummyFloatBuffer(device), nil) }
        let errors = try mods.makeErrorBuffer(device)
        return (errors, ErrorCheck(errors: errors, captures: mods.glsl.captures))
    }

    /// Makes reading any of `outputs` throw what the BlockMask's build or the kernel reported.
    static func addChecks(_ check: ErrorCheck?, blockMask: BlockMask?, to outputs: [Tensor?]) {
        for check in [blockMask?.errorCheck, check].compactMap({ $0 }) {
            for t in outputs { t?.addCheck(check) }
        }
    }

    /// The bytes of `t` that batches `batches` and heads `heads` cover (all of L and D).
    static func span(_ t: Tensor, batches: Range<Int>, heads: Range<Int>) -> (first: Int, lower: Int, upper: Int) {
        let size = t.dtype.size
        let first = t.byteOffset + (batches.lowerBound * t.strides[0] + heads.lowerBound * t.strides[1]) * size
        var lo = first, hi = first + size
        for (d, (n, st)) in zip(t.shape, t.strides).enumerated() {
            let extent = d == 0 ? batches.count : d == 1 ? heads.count : n
            guard extent > 0 else { continue }
            if st >= 0 { hi += (extent - 1) * st * size } else { lo += (extent - 1) * st * size }
        }
        return (first, lo, hi)
    }

    /// Binds the part of `t` that `batches` and `heads` use; returns the binding and the element
    /// offset of element (batches.first, heads.first, 0, 0) inside it.
    static func bind(_ t: Tensor, batches: Range<Int>, heads: Range<Int>, writes: Bool, device: Device) throws -> (BufferBinding, Int) {
        let size = t.dtype.size
        let align = device.capabilities.minStorageBufferOffsetAlignment
        let (first, lo, hi) = span(t, batches: batches, heads: heads)
        let start = lo / align * align
        guard (first - start) % size == 0 else { throw FlexError("\(t.name) is not aligned to its element size") }
        return (BufferBinding(t.buffer, offset: start, size: hi - start, writes: writes), (first - start) / size)
    }

    struct Chunk { let b: Range<Int>; let h: Range<Int> }

    /// Dispatches such that every binding fits the device's storage-buffer range: all at once,
    /// else by groups of batches, else one batch and a group of heads at a time.
    static func planChunks(_ s: AttentionShape, q: Tensor, k: Tensor, v: Tensor, output: Tensor, lse: Tensor?, device: Device) throws -> [Chunk] {
        let caps = device.capabilities
        let limit = caps.maxStorageBufferRange - caps.minStorageBufferOffsetAlignment
        let group = s.Hq / max(1, s.Hkv)
        func fits(_ b: Range<Int>, _ h: Range<Int>) -> Bool {
            let kvh = (h.lowerBound / group)..<((h.upperBound - 1) / group + 1)
            let parts: [(Tensor, Range<Int>)] = [(q, h), (k, kvh), (v, kvh), (output, h)] + (lse.map { [($0, h)] } ?? [])
            return parts.allSatisfy { t, heads in
                let sp = span(t, batches: b, heads: heads)
                return sp.upper - sp.lower <= limit
            }
        }
        if fits(0..<s.B, 0..<s.Hq) { return [Chunk(b: 0..<s.B, h: 0..<s.Hq)] }
        var chunks: [Chunk] = []
        if fits(0..<1, 0..<s.Hq) {
            var b0 = 0
            while b0 < s.B {
                var nb = 1
                while b0 + nb < s.B && fits(b0..<(b0 + nb + 1), 0..<s.Hq) { nb += 1 }
                chunks.append(Chunk(b: b0..<(b0 + nb), h: 0..<s.Hq))
                b0 += nb
            }
            return chunks
        }
        for b in 0..<s.B {
            var h0 = 0
            while h0 < s.Hq {
                guard fits(b..<(b + 1), h0..<(h0 + 1)) else {
                    throw FlexError.limitExceeded("one head of one batch spans more than \(formatBytes(caps.maxStorageBufferRange)), what \(caps.name) binds per buffer; split the sequence")
                }
                var nh = 1
                while h0 + nh < s.Hq && fits(b..<(b + 1), h0..<(h0 + nh + 1)) { nh += 1 }
                chunks.append(Chunk(b: b..<(b + 1), h: h0..<(h0 + nh)))
                h0 += nh
            }
        }
        return chunks
    }

    /// Stand-ins for bindings a call does not use (no BlockMask, no LSE, no max scores, parameters
    /// as push constants), one per device: the kernels never read or write them then.
    static func dummyIndexBuffer(_ device: Device) throws -> Tensor {
        try device.memoized("vkflex.attention.unused-indices") { try device.tensor([Int32(0)], shape: [1], name: "no_block_mask") }
    }

    static func dummyFloatBuffer(_ device: Device) throws -> Buffer {
        try device.memoized("vkflex.attention.unused-buffer") { try device.makeBuffer(bytes: 16) }
    }
}

/// Reads a kernel's error buffer when its output is read.
final class ErrorCheck: @unchecked Sendable {
    let errors: Buffer
    let captures: [CaptureInfo]
    init(errors: Buffer, captures: [CaptureInfo]) { self.errors = errors; self.captures = captures }
    func run() throws {
        try SplicedMods.decode(try errors.download(count: 4, as: Int32.self), captures: captures)
    }
    /// The kernels that write the flag have completed and reported nothing (no wait): the check
    /// has nothing left to say.
    var settledClean: Bool {
        errors.writesCompleted && (try? errors.download(count: 1, as: Int32.self))?.first == 0
    }
}
