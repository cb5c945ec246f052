// The block walk the attention kernels share (forward, split-KV decoding, backward): the BlockMask
// row of (batch b, head h, query block qb), and the KV blocks a walk over it visits — the full
// ones first (pass 0), then the partial ones (pass 1), whose pairs go through mask_mod; without a
// BlockMask (p.dense) every KV block, as full. A BlockMask of B or H 1 is broadcast.
// Needs p.mask_b, p.mask_h, p.q_blocks, p.kv_blocks, p.dense and the buffers kv_num, kv_idx,
// full_kv_num, full_kv_idx. With VKF_WALK_TRANSPOSED also the transpose (the backward's dK/dV
// pass): the query blocks of KV block kb, from q_num, q_idx_list, full_q_num, full_q_idx_list.
int walk_row(int b, int h, int qb) { return ((p.mask_b == 1 ? 0 : b) * p.mask_h + (p.mask_h == 1 ? 0 : h)) * p.q_blocks + qb; }
int walk_count(int pass, int mrow) { return p.dense != 0 ? (pass == 0 ? p.kv_blocks : 0) : (pass == 0 ? full_kv_num[mrow] : kv_num[mrow]); }
int walk_block(int pass, int mrow, int i) {
    return p.dense != 0 ? i : (pass == 0 ? full_kv_idx[mrow * p.kv_blocks + i] : kv_idx[mrow * p.kv_blocks + i]);
}
#ifdef VKF_WALK_TRANSPOSED
int walk_col(int b, int h, int kb) { return ((p.mask_b == 1 ? 0 : b) * p.mask_h + (p.mask_h == 1 ? 0 : h)) * p.kv_blocks + kb; }
int walk_count_t(int pass, int mcol) { return p.dense != 0 ? (pass == 0 ? p.q_blocks : 0) : (pass == 0 ? full_q_num[mcol] : q_num[mcol]); }
int walk_query_block(int pass, int mcol, int i) {
    return p.dense != 0 ? i : (pass == 0 ? full_q_idx_list[mcol * p.q_blocks + i] : q_idx_list[mcol * p.q_blocks + i]);
}
#endif
