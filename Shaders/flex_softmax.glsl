// The online softmax over a tile of scores in shared memory, a subgroup's rows at a time, with no
// assumption about which invocation a cooperative matrix gave which element: the scores were
// stored to shared memory (coopMatStore, or a scalar loop), and each lane takes fixed rows and
// columns of its own choosing. For flex_attention_fwd_generic.comp, on every subgroup size.
//
// A subgroup of SG lanes owns SM_ROWS rows. SM_TPR lanes share a row (SG / SM_ROWS where the
// subgroup is wider than its rows, else 1); lane l takes rows l / SM_TPR + k * SM_LR (k <
// SM_RPL) and, in each, columns l % SM_TPR + t * SM_TPR. Row maxima reduce over the SM_TPR lanes of
// a row with a clustered subgroup max (clusters are consecutive invocation ids: the spec's
// grouping, not a layout); the row sums stay per lane until the end (sm_row_sum).
//
// Before including, define SG (subgroup size), SM_ROWS (rows per subgroup), and SM_COLS (columns
// of a score tile); the includer supplies sm_score(k, t) (the lane's k-th row, t-th column: the
// score in log2 units after scale, mods and mask, -inf where masked or out of range) and
// sm_put(k, t, p) (writes P).
#if SG >= SM_ROWS
#define SM_TPR (SG / SM_ROWS)
#else
#define SM_TPR 1
#endif
#define SM_LR (SG / SM_TPR)           // rows the subgroup covers at a time
#define SM_RPL (SM_ROWS / SM_LR)      // rows per lane
#define SM_CPL (SM_COLS / SM_TPR)     // columns per lane and row
#if SM_TPR > 1
#extension GL_KHR_shader_subgroup_clustered : require
#define SM_ROW_MAX(x) subgroupClusteredMax(x, SM_TPR)
#define SM_ROW_ADD(x) subgroupClusteredAdd(x, SM_TPR)
#else
#define SM_ROW_MAX(x) (x)
#define SM_ROW_ADD(x) (x)
#endif

// The lane's k-th row (within the subgroup's rows) and its first column.
int sm_row(int lane, int k) { return lane / SM_TPR + k * SM_LR; }
int sm_col0(int lane) { return lane - (lane / SM_TPR) * SM_TPR; }

// One tile: m (running maxima, log2 units, starting at a finite -1e30), l (this lane's shares of
// the row sums) and alpha (each row's rescale factor for O) per lane row. Every lane runs it
// (the reductions are subgroup operations).
//
// With SM_TAU defined, the running maximum is raised only when a tile's maximum passes it by more
// than SM_TAU (log2 units): P then stays below 2^SM_TAU (fine in fp16), alpha is exactly 1 on
// most tiles, and the final division by l makes the result exact all the same — so O needs
// rescaling only on the rare tiles where alpha is not 1.
void sm_tile(inout float m[SM_RPL], inout float l[SM_RPL], out float alpha[SM_RPL]) {
    [[unroll]] for (int k = 0; k < SM_RPL; ++k) {
        float s[SM_CPL];
        float mx = m[k];
        [[unroll]] for (int t = 0; t < SM_CPL; ++t) { s[t] = sm_score(k, t); mx = max(mx, s[t]); }
        mx = SM_ROW_MAX(mx);
#ifdef SM_TAU
        mx = mx > m[k] + SM_TAU ? mx : m[k];
#endif
        float sum = 0.0;
        [[unroll]] for (int t = 0; t < SM_CPL; ++t) {
            const float pt = exp2(s[t] - mx);
            sm_put(k, t, pt);
            sum += pt;
        }
        alpha[k] = exp2(m[k] - mx);
        m[k] = mx;
        l[k] = l[k] * alpha[k] + sum;
    }
}

// A row's sum from the lanes' shares (every lane of the row gets it).
float sm_row_sum(float l) { return SM_ROW_ADD(l); }
