#!/usr/bin/env python3
"""Random conformance cases through the CLI against an independent float64 NumPy reference.

Like the issues' held-out suites: random shapes (odd lengths and head dims, Lq != Lkv, GQA),
score-mods with their derivatives, masks (some leaving rows with no key), block sizes, float32,
float16 and bfloat16, --grad-lse, attention sinks (and their gradient), captured tensors (document ids; ALiBi
slopes and their gradient), decoding rows with --q-offset and --kv-lens, paged caches with permuted pages
poisoned with NaN and -1 padding; then bad inputs, which must exit 1 with a message. Each case
runs `vkflex attend` and compares out, LSE and (backward cases) dQ, dK, dV by relative L2 error:
at most 1e-4 for float32 inputs, 5e-3 for float16 and 2e-2 for bfloat16 (vkflex selftest's), and
for the sinks' and captures' gradients 1e-3, 1e-2 and 5e-2 (docs/guide.md's); never NaN.

    python3 tools/conformance.py [--cases 40] [--seed N] [--kinds backward,...] [--vkflex PATH] [--keep DIR] [--torch]

--torch (needs PyTorch; on the GPU machine: `bash .device/on-device.sh python3 tools/conformance.py
--torch --kinds prefill,backward`) adds PyTorch's own test rule, on the same inputs: for each of
out, LSE, dQ, dK and dV, vkflex's mean absolute error against the float64 reference must be at
most the fudge factor (1.1 for float16 and bfloat16 inputs, 10 for float32) times that of PyTorch's
eager FlexAttention in the inputs' dtype (test/inductor/test_flex_attention.py, `_check_equal`,
with vkflex in the place of the compiled kernel). It draws no attention sinks (PyTorch's
FlexAttention has none) and judges prefill and backward cases (the decode and paged kinds have
query offsets and paged caches that PyTorch expresses differently: they keep the float64 check).

Needs NumPy. Exits 1 when a case fails. The reference is written here from PyTorch's
definition, not from vkflex's (Sources/VKFlex/Reference.swift), so the two check each other.
"""
import argparse, os, re, shutil, subprocess, sys, tempfile
import numpy as np

# score-mods: (vkflex text, f(s, b, h, q, kv), d f / d s)
SCORES = [
    ("score", lambda s, b, h, q, k: s, lambda s, b, h, q, k: np.ones_like(s)),
    ("20 * tanh(score / 20)", lambda s, b, h, q, k: 20 * np.tanh(s / 20), lambda s, b, h, q, k: 1 - np.tanh(s / 20) ** 2),
    ("score + (kv_idx - q_idx) * 0.05 * (h + 1)", lambda s, b, h, q, k: s + (k - q) * 0.05 * (h + 1), lambda s, b, h, q, k: np.ones_like(s)),
    ("score * 0.5 - abs(q_idx - kv_idx) * 0.01", lambda s, b, h, q, k: s * 0.5 - np.abs(q - k) * 0.01, lambda s, b, h, q, k: np.full_like(s, 0.5)),
    ("where(b == 0, score * 2, score)", lambda s, b, h, q, k: np.where(b == 0, s * 2, s), lambda s, b, h, q, k: np.where(b == 0, 2.0, 1.0) + 0 * s),
    # ALiBi with learnable slopes: a float32 capture (CAP["slope"], one per query head) whose
    # gradient the backward cases check (--grad-capture).
    ("score + slope[h] * (kv_idx - q_idx)", lambda s, b, h, q, k: s + CAP["slope"][h] * (k - q), lambda s, b, h, q, k: np.ones_like(s)),
]
# Captured tensors of the current case (set per case; the mods above and below read them).
CAP = {}
# masks: (vkflex text or None, f(b, h, q, kv))
MASKS = [
    (None, lambda b, h, q, k: np.ones(np.broadcast(b, h, q, k).shape, bool)),
    ("q_idx >= kv_idx", lambda b, h, q, k: q >= k),
    ("(q_idx >= kv_idx) & (q_idx - kv_idx <= 40)", lambda b, h, q, k: (q >= k) & (q - k <= 40)),
    ("(kv_idx <= 20) | (q_idx >= kv_idx)", lambda b, h, q, k: (k <= 20) | (q >= k)),
    ("q_idx // 37 == kv_idx // 37", lambda b, h, q, k: q // 37 == k // 37),
    ("q_idx - kv_idx >= 3", lambda b, h, q, k: q - k >= 3),   # the first rows see no key
    ("(h + q_idx + kv_idx) % 3 != 0", lambda b, h, q, k: (h + q + k) % 3 != 0),
    # Document masking: an int32 capture (CAP["doc"], a document id per position).
    ("(doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)", lambda b, h, q, k: (CAP["doc"][q] == CAP["doc"][k]) & (q >= k)),
]


def torch_mods(torch, cap):
    """SCORES' and MASKS' functions for PyTorch's FlexAttention (`cap`: CAP's tensors as torch
    tensors on its device), in the same order; None for "no mask"."""
    scores = [
        lambda s, b, h, q, k: s,
        lambda s, b, h, q, k: 20 * torch.tanh(s / 20),
        lambda s, b, h, q, k: s + (k - q) * 0.05 * (h + 1),
        lambda s, b, h, q, k: s * 0.5 - torch.abs(q - k) * 0.01,
        lambda s, b, h, q, k: torch.where(b == 0, s * 2, s),
        lambda s, b, h, q, k: s + cap["slope"][h] * (k - q),
    ]
    masks = [
        None,
        lambda b, h, q, k: q >= k,
        lambda b, h, q, k: (q >= k) & (q - k <= 40),
        lambda b, h, q, k: (k <= 20) | (q >= k),
        lambda b, h, q, k: q // 37 == k // 37,
        lambda b, h, q, k: q - k >= 3,
        lambda b, h, q, k: (h + q + k) % 3 != 0,
        lambda b, h, q, k: (cap["doc"][q] == cap["doc"][k]) & (q >= k),
    ]
    assert len(scores) == len(SCORES) and len(masks) == len(MASKS)
    return scores, masks


def torch_eager(torch, q, k, v, dtype, score, mask, scale, dO, dLSE):
    """PyTorch's eager FlexAttention in the inputs' dtype (the `ref` of PyTorch's test rule): out,
    LSE and, given dO, (dq, dk, dv), as float64 NumPy arrays."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    td = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]
    # PyTorch's FlexAttention has no backward on the CPU: there the rule judges the forward only.
    grad = dO is not None and dev != "cpu"
    t = lambda x, g=False: torch.tensor(np.asarray(x, np.float32), device=dev).to(td).requires_grad_(g)
    cap = {name: torch.tensor(val.astype(np.float32) if val.dtype.kind == "f" else val, device=dev) for name, val in CAP.items()}
    scores, masks = torch_mods(torch, cap)
    B, Hq, Lq, _ = q.shape
    Lkv = k.shape[2]
    bm = None if masks[mask] is None else create_block_mask(masks[mask], B, Hq, Lq, Lkv, device=dev)
    qt, kt, vt = t(q, grad), t(k, grad), t(v, grad)
    out, lse = flex_attention(qt, kt, vt, score_mod=scores[score], block_mask=bm, scale=scale,
                              enable_gqa=Hq != k.shape[1], return_lse=True)
    f64 = lambda x: x.detach().to(torch.float64).cpu().numpy()
    grads = None
    if grad:
        outs, gs = [out], [t(dO)]
        if dLSE is not None:
            outs.append(lse); gs.append(torch.tensor(dLSE, device=dev, dtype=lse.dtype))
        grads = [f64(x) for x in torch.autograd.grad(outs, [qt, kt, vt], gs)]
    return f64(out), f64(lse), grads


def mean_abs_error(a, golden):
    """PyTorch's test rule's error, mean |golden - a|; entries that are -inf in both (an empty
    row's LSE) count as equal; any other non-finite entry makes it inf or NaN."""
    a, golden = np.asarray(a, np.float64), np.asarray(golden, np.float64)
    same_inf = np.isinf(a) & np.isinf(golden) & (np.sign(a) == np.sign(golden))
    d = np.abs(np.where(same_inf, 0, golden) - np.where(same_inf, 0, a))
    return float(d.mean()) if d.size else 0.0


def reference(q, k, v, score, mask, scale, q_off, kv_lens, dO=None, dLSE=None, sinks=None):
    """Forward (out, lse) and, given dO, (dq, dk, dv, dsinks), in float64, PyTorch's semantics;
    a sink joins each softmax denominator of its head (docs/guide.md, "Attention sinks")."""
    B, Hq, Lq, D = q.shape
    Hkv, Lkv = k.shape[1], k.shape[2]
    g = Hq // Hkv
    out = np.zeros((B, Hq, Lq, v.shape[3])); lse = np.full((B, Hq, Lq), -np.inf)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    dsinks, dslope = np.zeros(Hq), np.zeros(Hq)
    for b in range(B):
        for h in range(Hq):
            hk = h // g
            qi = (np.arange(Lq) + q_off[b])[:, None]
            kj = np.arange(Lkv)[None, :]
            s = scale * q[b, h] @ k[b, hk].T
            sm = SCORES[score][1](s, b, h, qi, kj)
            ok = MASKS[mask][1](b, h, qi, kj) & (kj < kv_lens[b])
            sm = np.where(ok, sm, -np.inf)
            sink = -np.inf if sinks is None else float(sinks[h])
            m = np.maximum(sm.max(axis=1, keepdims=True), sink)
            mf = np.where(np.isfinite(m), m, 0)
            e = np.where(ok, np.exp(sm - mf), 0)
            l = e.sum(axis=1, keepdims=True) + (np.exp(sink - mf) if np.isfinite(sink) else 0)
            p = np.where(l > 0, e / np.where(l > 0, l, 1), 0)
            out[b, h] = p @ v[b, hk]
            lse[b, h] = np.where(l[:, 0] > 0, (mf + np.log(np.where(l > 0, l, 1)))[:, 0], -np.inf)
            if dO is not None:
                do = dO[b, h]
                dv[b, hk] += p.T @ do
                dp = do @ v[b, hk].T
                delta = (do * out[b, h]).sum(axis=1, keepdims=True) - (dLSE[b, h][:, None] if dLSE is not None else 0)
                ds = p * (dp - delta) * np.where(ok, SCORES[score][2](s, b, h, qi, kj), 0)
                dslope[h] += (np.where(ok, p * (dp - delta), 0) * (kj - qi)).sum()
                if np.isfinite(sink):
                    dsinks[h] -= (np.exp(sink - lse[b, h]) * delta[:, 0]).sum()
                dq[b, h] += scale * ds @ k[b, hk]
                dk[b, hk] += scale * ds.T @ q[b, h]
    return out, lse, (dq, dk, dv, dsinks, dslope)


def bf16(x):
    """float32 values rounded to bfloat16 (to nearest, ties to even), as float32."""
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    return np.where(np.isnan(x), x, r.view(np.float32)).astype(np.float32)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    fin = np.isfinite(b)
    if not np.array_equal(fin, np.isfinite(a)) or not np.array_equal(a[~fin], b[~fin]):
        return np.inf
    n = np.linalg.norm(b[fin])
    return np.linalg.norm(a[fin] - b[fin]) / max(n, 1e-30)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=40)
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--vkflex", default=shutil.which("vkflex") or ".build/debug/vkflex")
    ap.add_argument("--keep", default=None, help="keep each case's files here")
    ap.add_argument("--kinds", default="prefill,backward,decode,paged", help="the kinds of case to cycle through")
    ap.add_argument("--torch", action="store_true", help="also PyTorch's test rule against its eager FlexAttention (prefill and backward)")
    a = ap.parse_args()
    torch = None
    if a.torch:
        import warnings
        import torch
        warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
        warnings.filterwarnings("ignore", message=".*return_lse is deprecated.*")
        # As PyTorch's tests set it (test_flex_attention.py): float32 matrix products may use TF32.
        torch.set_float32_matmul_precision("high")
        print(f"PyTorch {torch.__version__} on {torch.cuda.get_device_name() if torch.cuda.is_available() else 'the CPU'}")
    seed = a.seed if a.seed is not None else int.from_bytes(os.urandom(4), "little")
    rng = np.random.default_rng(seed)
    print(f"seed {seed}, {a.cases} cases, {a.vkflex}")
    work = a.keep or tempfile.mkdtemp(prefix="vkflex-conf-")
    os.makedirs(work, exist_ok=True)
    f = lambda name: os.path.join(work, name)
    kinds = a.kinds.split(",")
    if not set(kinds) <= {"prefill", "backward", "decode", "paged"}: sys.exit(f"--kinds: {a.kinds}: use prefill, backward, decode, paged")
    failures = 0
    for n in range(a.cases):
        kind = kinds[n % len(kinds)]
        # bfloat16: float32 files, --dtype bfloat16 (the CLI rounds them on upload).
        u = rng.random(); dtype = np.float16 if u < 0.35 else np.float32; is_bf16 = u >= 0.85
        B = int(rng.integers(1, 3)); Hkv = int(rng.choice([1, 2])); g = int(rng.choice([1, 2, 4]))
        Hq = Hkv * g
        # Head dims: the common ones, odd ones (not a multiple of 8, or of 16) and large ones.
        D = int(rng.choice([8, 16, 24, 40, 64, 72, 128, 3, 33, 100, 160, 256])) if kind != "backward" else int(rng.choice([8, 24, 40, 64, 5, 36, 128]))
        Dv = D if rng.random() < 0.7 or kind == "paged" else int(rng.choice([8, 32, 48, 7]))
        if kind == "decode" or kind == "paged":
            Lq = int(rng.choice([1, 2, 4, 16 // g if 16 // g > 0 else 1])); Lkv = int(rng.integers(1, 700))
        else:
            Lq = int(rng.integers(1, 300)); Lkv = int(rng.integers(1, 300)) if rng.random() < 0.5 else Lq
        score = int(rng.integers(len(SCORES))); mask = int(rng.integers(len(MASKS)))
        bs = [None, 16, 32, 64, (16, 32)][int(rng.integers(5))] if kind != "paged" else None
        rnd = bf16 if is_bf16 else (lambda x: x.astype(dtype))
        q = rnd(rng.standard_normal((B, Hq, Lq, D)))
        k = rnd(rng.standard_normal((B, Hkv, Lkv, D)))
        v = rnd(rng.standard_normal((B, Hkv, Lkv, Dv)))
        q_off = np.zeros(B, np.int64); kv_lens = np.full(B, Lkv, np.int64)
        args = [a.vkflex, "attend", "--q", f("q.npy"), "--k", f("k.npy"), "--v", f("v.npy"), "--out", f("out.npy"), "--lse", f("lse.npy")]
        if g > 1: args.append("--gqa")
        if is_bf16: args += ["--dtype", "bfloat16"]
        CAP.clear()
        if "slope[" in SCORES[score][0]:
            CAP["slope"] = -np.exp2(-8.0 * (np.arange(Hq) + 1) / Hq) * rng.uniform(0.5, 2)
            np.save(f("slope.npy"), CAP["slope"].astype(np.float32)); args += ["--capture", "slope=" + f("slope.npy")]
            CAP["slope"] = CAP["slope"].astype(np.float32).astype(np.float64)
        if MASKS[mask][0] and "doc[" in MASKS[mask][0]:
            n_pos = Lkv + Lq + 129   # every position a query row or key can have (paged: whole pages)
            CAP["doc"] = np.cumsum(rng.random(n_pos) < 0.03).astype(np.int32)
            np.save(f("doc.npy"), CAP["doc"]); args += ["--capture", "doc=" + f("doc.npy")]
        if SCORES[score][0] != "score": args += ["--score-mod", SCORES[score][0]]
        if MASKS[mask][0]: args += ["--mask-mod", MASKS[mask][0]]
        if bs: args += ["--block-size", f"{bs[0]}x{bs[1]}" if isinstance(bs, tuple) else str(bs)]
        if kind == "decode" and rng.random() < 0.6:
            kv_lens = rng.integers(0, Lkv + 1, B)
            np.save(f("lens.npy"), kv_lens.astype(np.int32)); args += ["--kv-lens", f("lens.npy")]
        if kind == "paged":
            kv_lens = rng.integers(1, Lkv + 1, B)
        if kind in ("decode", "paged"):
            # Mostly the rows a decode step has (the last ones of each sequence), sometimes anywhere.
            q_off = rng.integers(0, max(1, Lkv - Lq + 1), B)
            q_off = np.where(rng.random(B) < 0.7, np.clip(kv_lens - Lq, 0, max(0, Lkv - Lq)), q_off)
            np.save(f("off.npy"), q_off.astype(np.int32)); args += ["--q-offset", f("off.npy")]
        np.save(f("q.npy"), q)
        if kind == "paged":
            P = int(rng.choice([16, 32, 64, 128]))
            maxp = -(-Lkv // P); used = sum(-(-int(x) // P) for x in kv_lens); npages = used + 3
            perm = rng.permutation(npages)
            table = np.full((B, maxp), -1, np.int32); kc = np.full((1, Hkv, npages * P, D), np.nan, dtype)
            vc = np.full((1, Hkv, npages * P, Dv), np.nan, dtype); at = 0
            for b in range(B):
                for lp in range(-(-int(kv_lens[b]) // P)):
                    pp = perm[at]; at += 1; table[b, lp] = pp
                    n_keys = min(P, int(kv_lens[b]) - lp * P)
                    kc[0, :, pp * P: pp * P + n_keys] = k[b, :, lp * P: lp * P + n_keys]
                    vc[0, :, pp * P: pp * P + n_keys] = v[b, :, lp * P: lp * P + n_keys]
            np.save(f("k.npy"), kc); np.save(f("v.npy"), vc); np.save(f("table.npy"), table)
            np.save(f("lens.npy"), kv_lens.astype(np.int32))
            args += ["--page-table", f("table.npy"), "--seq-lens", f("lens.npy"), "--page-size", str(P)]
            k = np.nan_to_num(k); v = np.nan_to_num(v)
        else:
            np.save(f("k.npy"), k); np.save(f("v.npy"), v)
        sinks = None
        if kind != "paged" and not a.torch and rng.random() < 0.25:
            sinks = rng.standard_normal(Hq).astype(np.float32) * 2
            if Hq > 1: sinks[0] = -np.inf   # "no sink" for that head
            np.save(f("sinks.npy"), sinks); args += ["--sinks", f("sinks.npy")]
        dO = dLSE = None
        if kind == "backward":
            dO = rnd(rng.standard_normal((B, Hq, Lq, Dv))); np.save(f("do.npy"), dO)
            args += ["--grad-out", f("do.npy"), "--dq", f("dq.npy"), "--dk", f("dk.npy"), "--dv", f("dv.npy")]
            if rng.random() < 0.5:
                dLSE = rng.standard_normal((B, Hq, Lq)).astype(np.float32); np.save(f("dlse.npy"), dLSE)
                args += ["--grad-lse", f("dlse.npy")]
            if sinks is not None: args += ["--grad-sinks", f("dsinks.npy")]
            if "slope" in CAP: args += ["--grad-capture", "slope=" + f("dslope.npy")]
        r = subprocess.run(args, capture_output=True, text=True)
        what = (f"{n:3d} {kind:8s} {'bfloat16' if is_bf16 else np.dtype(dtype).name:8s} B={B} H={Hq}/{Hkv} Lq={Lq} Lkv={Lkv} D={D}/{Dv} "
                f"score={SCORES[score][0]!r} mask={MASKS[mask][0]!r} bs={bs}{' sinks' if sinks is not None else ''}")
        if r.returncode != 0:
            failures += 1; print("FAIL", what, "\n     exit", r.returncode, r.stderr.strip()[:400]); continue
        # Which kernel ran the case (the forward's, as `vkflex attend` reports it).
        ran = re.search(r", ([a-z0-9-]+) kernel", r.stdout)
        what += " [" + (ran.group(1) if ran else "?") + "]"
        f64 = lambda x: None if x is None else x.astype(np.float64)
        ro, rl, rg = reference(f64(q), f64(k), f64(v), score, mask, 1 / np.sqrt(D), q_off, kv_lens, f64(dO), f64(dLSE), f64(sinks))
        # vkflex selftest's tolerances: bfloat16's 8-bit significand rounds P and the outputs too.
        tol = 2e-2 if is_bf16 else 5e-3 if dtype == np.float16 else 1e-4
        errs = {"out": rel(np.load(f("out.npy")), ro), "lse": rel(np.load(f("lse.npy")), rl)}
        if kind == "backward":
            for name, ref in zip(["dq", "dk", "dv"], rg):
                errs[name] = rel(np.load(f(name + ".npy")), ref)
            if sinks is not None:
                errs["dsinks"] = rel(np.load(f("dsinks.npy")), rg[3])
            if "slope" in CAP:
                errs["dslope"] = rel(np.load(f("dslope.npy")), rg[4])
        # The sinks' and captures' gradients are sums of P (dP - Δ) whose terms cancel, with Δ from
        # the stored 16-bit output (as PyTorch's): the tests' and docs/guide.md's 1e-3 / 1e-2 rule.
        ctol = 5e-2 if is_bf16 else 1e-2 if dtype == np.float16 else 1e-3
        bad = {k_: e for k_, e in errs.items() if not e <= (ctol if k_ in ("dsinks", "dslope") else tol)}
        rule = ""
        if torch is not None and kind in ("prefill", "backward"):
            # PyTorch's test rule: vkflex in the place of its compiled kernel, its eager
            # FlexAttention in the inputs' dtype as the ref, the float64 reference as the golden.
            name = "bfloat16" if is_bf16 else np.dtype(dtype).name
            fudge = 10.0 if name == "float32" else 1.1
            to, tl, tg = torch_eager(torch, q, k, v, name, score, mask, 1 / np.sqrt(D), dO, dLSE)
            ours = {"out": np.load(f("out.npy")), "lse": np.load(f("lse.npy"))}
            theirs, golden = {"out": to, "lse": tl}, {"out": ro, "lse": rl}
            if kind == "backward" and tg is not None:
                for i, nm in enumerate(["dq", "dk", "dv"]):
                    ours[nm], theirs[nm], golden[nm] = np.load(f(nm + ".npy")), tg[i], rg[i]
            ratios = {}
            for nm in ours:
                e_ours, e_ref = mean_abs_error(ours[nm], golden[nm]), mean_abs_error(theirs[nm], golden[nm])
                if np.isnan(e_ref):
                    ratios[nm] = "ref-NaN"   # PyTorch's own ref failed its rule: nothing to hold vkflex to
                    continue
                if not e_ours <= fudge * e_ref:
                    bad["torch-" + nm] = e_ours
                ratios[nm] = "%.2f" % (e_ours / e_ref) if e_ref > 0 else ("0" if e_ours == 0 else "inf")
            rule = " | vs PyTorch (at most %g): " % fudge + " ".join(f"{nm} {r}" for nm, r in ratios.items())
        status = "FAIL" if bad else "ok  "
        failures += bool(bad)
        print(status, what, " ".join(f"{k_} {e:.1e}" for k_, e in errs.items()) + rule)
    # Bad inputs: exit 1 and a message naming the problem.
    np.save(f("q.npy"), rng.standard_normal((1, 2, 8, 16)).astype(np.float32))
    np.save(f("k.npy"), rng.standard_normal((1, 2, 8, 16)).astype(np.float32))
    np.save(f("v.npy"), rng.standard_normal((1, 2, 8, 16)).astype(np.float32))
    np.save(f("do_bad.npy"), rng.standard_normal((1, 2, 8, 15)).astype(np.float32))
    np.save(f("do16.npy"), rng.standard_normal((1, 2, 8, 16)).astype(np.float16))
    np.save(f("lens_bad.npy"), np.array([9], np.int32))
    np.save(f("off_bad.npy"), np.array([-1], np.int32))
    np.save(f("table_bad.npy"), np.array([[0, 5]], np.int32))   # page 5 of a 2-page cache
    np.save(f("seq8.npy"), np.array([8], np.int32))
    base = [a.vkflex, "attend", "--q", f("q.npy"), "--k", f("k.npy"), "--v", f("v.npy"), "--out", f("out.npy")]
    for extra, expect in [
        (["--grad-out", f("do_bad.npy"), "--dq", f("dq.npy")], "grad"),
        (["--grad-out", f("do16.npy"), "--dq", f("dq.npy")], "dtype"),
        (["--dq", f("dq.npy")], "--grad-out"),
        (["--kv-lens", f("lens_bad.npy")], "kv"),
        (["--q-offset", f("off_bad.npy")], "offset"),
        (["--mask-mod", "q_idx >= "], "mask"),
        (["--score-mod", "score + nope"], "nope"),
        (["--page-table", f("table_bad.npy"), "--seq-lens", f("seq8.npy"), "--page-size", "4"], "page"),
        (["--page-table", f("table_bad.npy"), "--seq-lens", f("seq8.npy"), "--page-size", "3"], "--page-size 3"),
    ]:
        r = subprocess.run(base + extra, capture_output=True, text=True)
        msg = (r.stderr + r.stdout).strip().splitlines()
        ok = r.returncode == 1 and msg and expect.lower() in " ".join(msg).lower() and "Fatal error" not in r.stderr
        failures += not ok
        print("ok  " if ok else "FAIL", "bad input", " ".join(extra[:2]), "->", r.returncode, (msg[-1] if msg else "")[:150])
    if not a.keep: shutil.rmtree(work, ignore_errors=True)
    print(f"{failures} failed (seed {seed})")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
