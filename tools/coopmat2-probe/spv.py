#!/usr/bin/env python3
"""Writes SPIR-V peak-throughput kernels for KHR cooperative matrices at subgroup or workgroup
scope (VK_NV_cooperative_matrix2). glslang 12 on the build machine knows neither
GL_KHR_cooperative_matrix nor GL_NV_cooperative_matrix2, so the module is written word by word.

usage: spv.py OUT.spv SCOPE M N K INVOCATIONS NACC ITER [SMEM]
  SCOPE: subgroup | workgroup. Each matrix group (one per subgroup at subgroup scope, one per
  workgroup at workgroup scope) keeps A (MxK fp16) and B (KxN fp16) and runs ITER rounds of NACC
  independent C += A*B (fp32), then stores its NACC accumulators (so nothing is dead).
"""
import struct, sys

class Module:
    def __init__(self):
        self.next_id = 1
        self.sections = {k: [] for k in ("cap", "ext", "mm", "entry", "exec", "dec", "types", "funcs")}
    def id(self):
        i = self.next_id; self.next_id += 1; return i
    def op(self, sec, opcode, *operands):
        words = []
        for o in operands:
            if isinstance(o, str):
                b = o.encode() + b"\0"
                b += b"\0" * (-len(b) % 4)
                words += list(struct.unpack("<%dI" % (len(b) // 4), b))
            elif isinstance(o, (list, tuple)):
                words += list(o)
            else:
                words.append(o)
        self.sections[sec].append([((len(words) + 1) << 16) | opcode] + words)
    def binary(self):
        words = [0x07230203, 0x00010300, 0, self.next_id, 0]
        for k in ("cap", "ext", "mm", "entry", "exec", "dec", "types", "funcs"):
            for ins in self.sections[k]:
                words += ins
        return struct.pack("<%dI" % len(words), *words)

def build(scope, M, N, K, inv, nacc, iters, smem=0):
    m = Module()
    for c in (1, 9, 4433, 6022):   # Shader, Float16, StorageBuffer16BitAccess, CooperativeMatrixKHR
        m.op("cap", 17, c)
    m.op("ext", 10, "SPV_KHR_cooperative_matrix")
    m.op("ext", 10, "SPV_KHR_16bit_storage")
    glsl = m.id(); m.op("ext", 11, glsl, "GLSL.std.450")
    m.op("mm", 14, 0, 1)           # Logical, GLSL450
    void, fvoid, main = m.id(), m.id(), m.id()
    uint, f32, f16 = m.id(), m.id(), m.id()
    m.op("types", 19, void); m.op("types", 33, fvoid, void)
    m.op("types", 21, uint, 32, 0); m.op("types", 22, f32, 32); m.op("types", 22, f16, 16)
    consts = {}
    def cu(v):
        if v not in consts:
            i = m.id(); m.op("types", 43, uint, i, v); consts[v] = i
        return consts[v]
    sc = cu(2 if scope == "workgroup" else 3)
    tA, tB, tC = m.id(), m.id(), m.id()
    m.op("types", 4456, tA, f16, sc, cu(M), cu(K), cu(0))
    m.op("types", 4456, tB, f16, sc, cu(K), cu(N), cu(1))
    m.op("types", 4456, tC, f32, sc, cu(M), cu(N), cu(2))
    # buffers: binding 0 fp16 (A and B), binding 1 fp32 (C)
    def sbuf(elem, stride, binding):
        arr, st, ptr, var, pe = m.id(), m.id(), m.id(), m.id(), m.id()
        m.op("types", 29, arr, elem); m.op("dec", 71, arr, 6, stride)
        m.op("types", 30, st, arr); m.op("dec", 71, st, 2); m.op("dec", 72, st, 0, 35, 0)
        m.op("types", 32, ptr, 12, st); m.op("types", 59, ptr, var, 12)
        m.op("dec", 71, var, 34, 0); m.op("dec", 71, var, 33, binding)
        m.op("types", 32, pe, 12, elem)
        return var, pe
    vh, ph = sbuf(f16, 2, 0)
    vf, pf = sbuf(f32, 4, 1)
    v3 = m.id(); m.op("types", 23, v3, uint, 3)
    pin = m.id(); m.op("types", 32, pin, 1, v3)
    wgid = m.id(); m.op("types", 59, pin, wgid, 1); m.op("dec", 71, wgid, 11, 26)   # WorkgroupId
    pin1 = m.id(); m.op("types", 32, pin1, 1, uint)
    sgid = m.id(); m.op("types", 59, pin1, sgid, 1); m.op("dec", 71, sgid, 11, 40)  # SubgroupId
    m.op("cap", 17, 61)   # GroupNonUniform (SubgroupId)
    f0 = m.id(); m.op("types", 43, f32, f0, 0)
    cz = m.id(); m.op("types", 44, tC, cz, f0)      # replicated composite: all zero
    boolt = m.id(); m.op("types", 20, boolt)
    m.op("entry", 15, 5, main, "main", wgid, sgid)
    m.op("exec", 16, main, 17, inv, 1, 1)
    F = lambda *a: m.op("funcs", *a)
    if smem:
        n_sh = 2 * (M * K + K * N)
        arr = m.id(); m.op("types", 28, arr, f16, cu(n_sh))
        pa_ = m.id(); m.op("types", 32, pa_, 4, arr)
        shv = m.id(); m.op("types", 59, pa_, shv, 4)
        pwe = m.id(); m.op("types", 32, pwe, 4, f16)
    # glslang's shape of a for loop: variables in Function storage, header -> condition -> body ->
    # continue -> header, merge after.
    pu = m.id(); m.op("types", 32, pu, 7, uint)
    pc = m.id(); m.op("types", 32, pc, 7, tC)
    F(54, void, main, 0, fvoid)
    l0 = m.id(); F(248, l0)
    i_var = m.id(); F(59, pu, i_var, 7)
    acc_vars = []
    for _ in range(nacc):
        v = m.id(); F(59, pc, v, 7); acc_vars.append(v)
    pa = m.id(); F(65, ph, pa, vh, cu(0), cu(0))
    a = m.id(); F(4457, tA, a, pa, cu(0), cu(K))
    pb = m.id(); F(65, ph, pb, vh, cu(0), cu(M * K))
    b = m.id(); F(4457, tB, b, pb, cu(0), cu(N))
    F(62, i_var, cu(0))
    for v in acc_vars: F(62, v, cz)
    lh, lcnd, lb, lcont, lm = m.id(), m.id(), m.id(), m.id(), m.id()
    F(249, lh)
    F(248, lh)
    F(246, lm, lcont, 0)
    F(249, lcnd)
    F(248, lcnd)
    iv = m.id(); F(61, uint, iv, i_var)
    cond = m.id(); F(176, boolt, cond, iv, cu(iters))
    F(250, cond, lb, lm)
    F(248, lb)
    if smem:
        ivb = m.id(); F(61, uint, ivb, i_var)
        par = m.id(); F(199, uint, par, ivb, cu(1))
        oa = m.id(); F(132, uint, oa, par, cu(M * K))
        ob0 = m.id(); F(132, uint, ob0, par, cu(K * N))
        ob = m.id(); F(128, uint, ob, ob0, cu(2 * M * K))
        pa2 = m.id(); F(65, pwe, pa2, shv, oa)
        a = m.id(); F(4457, tA, a, pa2, cu(0), cu(K))
        pb2 = m.id(); F(65, pwe, pb2, shv, ob)
        b = m.id(); F(4457, tB, b, pb2, cu(0), cu(N))
    for v in acc_vars:
        x = m.id(); F(61, tC, x, v)
        y = m.id(); F(4459, tC, y, a, b, x)
        F(62, v, y)
    F(249, lcont)
    F(248, lcont)
    iv2 = m.id(); F(61, uint, iv2, i_var)
    inc = m.id(); F(128, uint, inc, iv2, cu(1))
    F(62, i_var, inc)
    F(249, lh)
    F(248, lm)
    accs = []
    for v in acc_vars:
        x = m.id(); F(61, tC, x, v); accs.append(x)
    wid = m.id(); F(61, v3, wid, wgid)
    wx = m.id(); F(81, uint, wx, wid, 0)
    groups = inv // 32 if scope == "subgroup" else 1
    if scope == "subgroup":
        s = m.id(); F(61, uint, s, sgid)
        t = m.id(); F(132, uint, t, wx, cu(groups))
        g = m.id(); F(128, uint, g, t, s)
    else:
        g = wx
    for j, x in enumerate(accs):
        t1 = m.id(); F(132, uint, t1, g, cu(nacc))
        t2 = m.id(); F(128, uint, t2, t1, cu(j))
        t3 = m.id(); F(132, uint, t3, t2, cu(M * N))
        p = m.id(); F(65, pf, p, vf, cu(0), t3)
        F(4458, p, x, cu(0), cu(N))
    F(253)
    F(56)
    return m.binary(), groups

if __name__ == "__main__":
    out, scope = sys.argv[1], sys.argv[2]
    args = list(map(int, sys.argv[3:]))
    data, groups = build(scope, *args)
    M, N, K, inv, nacc, iters = args[:6]
    open(out, "wb").write(data)
    # flops per workgroup, for the runner
    print(2 * M * N * K * nacc * iters * groups)
