// What the split-KV decode kernels share (flex_attention_decode.comp, and
// flex_attention_decode_mm.comp through cooperative matrices): the walk over one split's share of
// a BlockMask row's kept blocks, counted by list position (so that skipped blocks cost nothing and
// every split gets the same number of kept blocks), and which (query head, query row) pair a
// workgroup's row r is. Include after flex_attention_common.glsl; define RMAX (rows per workgroup).
// The grid: x = split, y = (KV head × head chunks × segments), z = batch of this dispatch. With
// DEC_NSG > 1 (the matrix kernel's subgroups, each walking a split of its own) x counts DEC_NSG
// splits a workgroup: subgroup g of workgroup x walks split x · DEC_NSG + g.
#ifndef DEC_NSG
#define DEC_NSG 1
#endif

// The walk's cursor: block t of this split's share (kb its key block, partial past the full ones)
// and the round starting at key k0 (keys before k_stop). Moves to the first round at or after the
// cursor that has keys; false past the share. Paged, a block that lies in one page (the page size
// a multiple of the block size) looks its page up once: row0, the physical row of its first key
// kb0 (-1: each key looks its own up).
// The walk reads block t + 1's index from the BlockMask as it enters block t (seek_next, -1: not
// read), so that the load's latency passes behind block t's keys instead of stalling the step that
// needs it (a BlockMask walk is a chain of dependent loads otherwise: one memory latency a block).
int seek_next = -1;
int seek_block(int t, int n_full, int mrow) { return t >= n_full ? walk_block(1, mrow, t - n_full) : walk_block(0, mrow, t); }
bool seek(inout int t, inout int k0, inout int k_stop, inout bool partial, inout int kb0, inout int row0,
          int t_end, int n_full, int mrow, int lkv, int b) {
    while (k0 >= k_stop) {
        if (++t >= t_end) return false;
        partial = t >= n_full;
        const int kb = seek_next >= 0 ? seek_next : seek_block(t, n_full, mrow);
        seek_next = t + 1 < t_end ? seek_block(t + 1, n_full, mrow) : -1;
        k0 = kb * p.kv_bs;
        k_stop = min(k0 + p.kv_bs, lkv);
        kb0 = k0;
#if VKF_PAGED
        row0 = p.page_size % p.kv_bs == 0 && k0 < k_stop ? kv_row(b, k0) : -1;
#endif
    }
    return true;
}
#if VKF_PAGED
#define KEY_ROW(key) (row0 >= 0 ? row0 + (key) - kb0 : kv_row(b, key))
#else
#define KEY_ROW(key) (key)
#endif

// Row r of chunk `chunk`: its query row and its query head (-1: none). A chunk's rows are RMAX of
// the KV head's group's (head, query row) pairs: consecutive ones in head-major order under a
// broadcast mask, RMAX query rows of one head under a per-head mask (p.dec_cph chunks a head). A
// pair past the group or the query rows, or whose position lies outside query block qb (another
// segment's), is no row.
int row_query(int r, int chunk) { return p.dec_cph > 0 ? (chunk % p.dec_cph) * RMAX + r : (chunk * RMAX + r) % p.Lq; }
int row_head(int r, int chunk, int hk, int group, int off, int qb) {
    const int hh = p.dec_cph > 0 ? chunk / p.dec_cph : (chunk * RMAX + r) / p.Lq, i = row_query(r, chunk);
    return hh < group && i < p.Lq && (off + i) / p.q_bs == qb ? hk * group + hh : -1;
}

// This workgroup's place: its split, batch (bl within the dispatch's bindings), KV head, chunk of
// rows, the query block all its rows lie in (qb: the batch's query offset plus its segment) and
// the head h0 whose BlockMask row it walks (any of the group under a broadcast mask; a per-head
// mask packs one head per workgroup); its split's share [t0, t_end) of that row's walked blocks
// (n_full of them full), the batch's key count and where its K and V head start.
struct DecodeWG { int split, bl, b, hk, chunk, group, off, qb, h0, mrow, n_full, t0, t_end, lkv, koff, voff; };
DecodeWG decode_wg() {
    DecodeWG w;
#if DEC_NSG > 1
    w.split = int(gl_WorkGroupID.x) * DEC_NSG + int(gl_SubgroupID);
#else
    w.split = int(gl_WorkGroupID.x);
#endif
    w.bl = int(gl_WorkGroupID.z);
    w.b = p.b_start + w.bl;
    const int y = int(gl_WorkGroupID.y);
    const int seg = y % p.dec_segs;
    w.chunk = (y / p.dec_segs) % p.dec_chunks;
    w.hk = y / (p.dec_segs * p.dec_chunks);
    w.group = p.Hq / p.Hkv;
#if VKF_Q_OFFSETS
    w.off = q_offsets[w.b];
#else
    w.off = 0;
#endif
    w.qb = w.off / p.q_bs + seg;
    w.h0 = w.hk * w.group + (p.dec_cph > 0 ? w.chunk / p.dec_cph : 0);
    w.mrow = walk_row(w.b, w.h0, w.qb);
    w.n_full = walk_count(0, w.mrow);
    const int n_all = w.n_full + walk_count(1, w.mrow), per = (n_all + p.splits - 1) / p.splits;
    w.t0 = w.split * per;
    w.t_end = min(n_all, w.t0 + per);
    w.lkv = KV_LEN(w.b);
    w.koff = p.k_base + w.bl * p.k_sb + (w.hk - p.hk_start) * p.k_sh;
    w.voff = p.v_base + w.bl * p.v_sb + (w.hk - p.hk_start) * p.v_sh;
    return w;
}
