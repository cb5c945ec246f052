#!/usr/bin/env python3
"""The module spv.py writes, with NV cooperative-matrix opcodes in place of the KHR ones, so that
SPIRV-Tools v2023.1 (which predates SPV_KHR_cooperative_matrix) can validate everything else:
  nvtwin.py OUT.spv subgroup M N K INVOCATIONS NACC ITER [SMEM] && spirv-val --target-env vulkan1.1spv1.4 OUT.spv
(NV types carry no use, so A and B get distinct row constants; use subgroup scope.)"""
import os, sys; sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import spv
M = spv.Module
orig_op = M.op
def op(self, sec, opcode, *ops):
    ops = list(ops)
    if opcode == 17 and ops == [6022]: ops = [5357]
    if opcode == 10 and ops == ["SPV_KHR_cooperative_matrix"]: ops = ["SPV_NV_cooperative_matrix"]
    if opcode == 4456:
        opcode = 5358; ops = ops[:5]
        if self.seen.get(tuple(ops[1:])): ops[3] = self.alt   # keep A and B distinct types
        self.seen[tuple(ops[1:])] = 1
    if opcode == 20 and getattr(self, "fpending", False):
        r = orig_op(self, sec, opcode, *ops); orig_op(self, "types", 42, ops[0], self.false); self.fpending = False; return r
    if opcode == 4457: opcode = 5359; ops = [ops[0], ops[1], ops[2], ops[4], self.false]
    if opcode == 4458: opcode = 5360; ops = [ops[0], ops[1], ops[3], self.false]
    if opcode == 4459: opcode = 5361
    return orig_op(self, sec, opcode, *ops)
M.op = op
orig_init = M.__init__
def init(self):
    orig_init(self); self.seen = {}
    self.false = self.id(); u = self.id(); self.alt = self.id()
    self.fpending = True
    orig_op(self, "types", 21, u, 32, 1); orig_op(self, "types", 43, u, self.alt, 16)
M.__init__ = init
data, _ = spv.build(*sys.argv[2:3], *map(int, sys.argv[3:]))
open(sys.argv[1], "wb").write(data)
