// CUDA kernels of the sortpool_ref engine: sorted weighted pooling.
//
// The same source is compiled three ways:
//   * by NVRTC through cupy.RawModule, instantiated per dtype and window
//     variant (and, for 2x2 and 3x3 stride-2 windows, per fixed geometry
//     and channel vector width) with name_expressions
//     (sortpool_ref/gpu/engine.py, sortpool_ref/gpu/_plan.py);
//   * by nvcc in the test suite, which instantiates every template;
//   * as host C++ (g++ -DSORTPOOL_HOST, with host_shim.h included first),
//     where a launch is a plain loop over blocks and threads, so that the
//     kernels' logic is executed on the CPU and compared with the reference.
// Hence: no shared memory, no __syncthreads, no atomics, no CUDA-only
// intrinsics. Every kernel is a grid-stride loop, so any launch geometry
// (tiny blocks in tests) computes the same result.
//
// Tensors are addressed as logical (N, H, W, C) with strides in elements
// (long long), so NHWC, NCHW and any other memory order share one code path.
// Indices and offsets are 64-bit; a 32-bit fast path splits the flat index
// when it fits.
//
// Ranking (SPEC.md section 3): NaN ranks above every number; equal values
// (and NaNs among themselves, and -0.0 with +0.0) keep scan order, the
// earlier kernel position ranking higher. Three ways to find the ranks of a
// window, mirroring the Numba engine's insertion top-k:
//   WIN > 0            comparator network over the WIN = kh*kw keys
//                      (value, scan position), held in registers;
//   WIN == 0, KMAX > 0 insertion into a top-KMAX list in registers, in scan
//                      order (ties stay stable because a later value only
//                      moves up past values it strictly outranks);
//   WIN == 0, KMAX == 0 no storage: the rank of a value is the number of
//                      window values that outrank it (large pool_range).

typedef long long sp_i64;

struct SpGeometry {
    int N, C, H, W, out_h, out_w;
    int kh, kw, sh, sw, dh, dw;
    int pt, pb, pl, pr;
    int has_pad;  // 1: padded positions hold pad_value and are ranked
    int k;        // pool_range
};

#define SP_GEOMETRY_PARAMS                                                  \
    int N, int C, int H, int W, int out_h, int out_w, int kh, int kw,       \
        int sh, int sw, int dh, int dw, int pt, int pb, int pl, int pr,     \
        int has_pad, int k
#define SP_GEOMETRY_INIT                                                    \
    {N, C, H, W, out_h, out_w, kh, kw, sh, sw, dh, dw, pt, pb, pl, pr,      \
     has_pad, k}

// The geometry with the kernel size and stride fixed at compile time
// (square KS x KS windows, stride ST on both axes, dilation 1): the fields
// below hide SpGeometry's, so that code templated on the geometry type G
// reads them as constants (loops unroll, divisions become shifts).
// SpFixed<0, 0> is the runtime geometry itself.
template <int KS, int ST>
struct SpFixed : SpGeometry {
    static constexpr int kh = KS, kw = KS, sh = ST, sw = ST, dh = 1, dw = 1;
};

template <>
struct SpFixed<0, 0> : SpGeometry {};

// V consecutive channels, loaded and stored as one aligned vector (one
// 16-byte access for 4 floats or 2 doubles); the caller guarantees the
// alignment (sortpool_ref.gpu._plan.vector_width).
template <typename T, int V>
struct alignas(sizeof(T) * V) SpVec {
    T v[V];
};

template <typename T, int V>
__device__ __forceinline__ SpVec<T, V> sp_vload(const T* p) {
    return *reinterpret_cast<const SpVec<T, V>*>(p);
}

template <typename T, int V>
__device__ __forceinline__ void sp_vstore(T* p, const SpVec<T, V>& a) {
    *reinterpret_cast<SpVec<T, V>*>(p) = a;
}

template <typename T, int V>
__device__ __forceinline__ SpVec<T, V> sp_vfill(T value) {
    SpVec<T, V> a;
#pragma unroll
    for (int l = 0; l < V; ++l) a.v[l] = value;
    return a;
}

__device__ __forceinline__ sp_i64 sp_first_index() {
    return (sp_i64)blockIdx.x * blockDim.x + threadIdx.x;
}

__device__ __forceinline__ sp_i64 sp_index_step() {
    return (sp_i64)gridDim.x * blockDim.x;
}

__device__ __forceinline__ int sp_min(int a, int b) { return a < b ? a : b; }

// Split a flat index over (n, c, a, b) where (a, b) are spatial: channels
// vary fastest when channels_inner (coalesced for NHWC), else b does.
template <typename I>
__device__ __forceinline__ void sp_split_as(I t, int channels_inner, int C,
                                            int A, int B, int& n, int& c,
                                            int& a, int& b) {
    if (channels_inner) {
        c = (int)(t % (I)C); t /= (I)C;
        b = (int)(t % (I)B); t /= (I)B;
        a = (int)(t % (I)A); n = (int)(t / (I)A);
    } else {
        b = (int)(t % (I)B); t /= (I)B;
        a = (int)(t % (I)A); t /= (I)A;
        c = (int)(t % (I)C); n = (int)(t / (I)C);
    }
}

__device__ __forceinline__ void sp_split(sp_i64 t, int channels_inner, int C,
                                         int A, int B, int& n, int& c, int& a,
                                         int& b) {
    if (t <= 0x7fffffffLL) {
        sp_split_as<unsigned int>((unsigned int)t, channels_inner, C, A, B, n,
                                  c, a, b);
    } else {
        sp_split_as<sp_i64>(t, channels_inner, C, A, B, n, c, a, b);
    }
}

// Whether a takes a higher rank than b by value alone (NaN above numbers).
template <typename T>
__device__ __forceinline__ bool sp_value_above(T a, T b) {
    return a > b || (a != a && b == b);
}

// Whether (va at scan sa) takes a higher rank than (vb at scan sb).
template <typename T>
__device__ __forceinline__ bool sp_ranks_above(T va, int sa, T vb, int sb) {
    if (sp_value_above(va, vb)) return true;
    if (sp_value_above(vb, va)) return false;
    return sa < sb;
}

// Value at padded-plane position (h, col) of one (n, c) plane; false when
// the position is not part of windows (outside the input and, without
// pad_value, any padding).
template <typename T, typename G>
__device__ __forceinline__ bool sp_load(const T* plane, sp_i64 s_h,
                                        sp_i64 s_w, const G& g,
                                        int h, int col, T pad_value, T& v) {
    if (h >= 0 && h < g.H && col >= 0 && col < g.W) {
        v = plane[h * s_h + col * s_w];
        return true;
    }
    if (g.has_pad && h >= -g.pt && h < g.H + g.pb && col >= -g.pl &&
        col < g.W + g.pr) {
        v = pad_value;
        return true;
    }
    return false;
}

// Number of taps start + i * step (i < taps) inside [lo, hi).
__device__ __forceinline__ int sp_taps_inside(int start, int step, int taps,
                                              int lo, int hi) {
    int count = 0;
    for (int i = 0; i < taps; ++i) {
        const int p = start + i * step;
        count += (p >= lo && p < hi);
    }
    return count;
}

// m_o = min(k, n_o) of the window whose top-left tap is (h0, w0).
template <typename G>
__device__ __forceinline__ int sp_kept_ranks(const G& g, int h0, int w0) {
    const int rows = g.has_pad
        ? sp_taps_inside(h0, g.dh, g.kh, -g.pt, g.H + g.pb)
        : sp_taps_inside(h0, g.dh, g.kh, 0, g.H);
    const int cols = g.has_pad
        ? sp_taps_inside(w0, g.dw, g.kw, -g.pl, g.W + g.pr)
        : sp_taps_inside(w0, g.dw, g.kw, 0, g.W);
    return sp_min(g.k, rows * cols);
}

// Rank (0-based) of value v at scan position s in the window at (h0, w0):
// the number of window values that outrank it, counted up to `limit`.
template <typename T, typename G>
__device__ __forceinline__ int sp_rank_in_window(const T* plane, sp_i64 s_h,
                                                 sp_i64 s_w, const G& g,
                                                 int h0,
                                                 int w0, T pad_value, T v,
                                                 int s, int limit) {
    int rank = 0;
    for (int i = 0; i < g.kh; ++i) {
        for (int j = 0; j < g.kw; ++j) {
            const int q = i * g.kw + j;
            T u = T(0);
            if (q == s || !sp_load(plane, s_h, s_w, g, h0 + i * g.dh,
                                   w0 + j * g.dw, pad_value, u)) {
                continue;
            }
            if (sp_ranks_above(u, q, v, s)) {
                if (++rank >= limit) return rank;
            }
        }
    }
    return rank;
}

// f(rank, v) for every position of the window at (h0, w0), in scan order,
// whose rank is below m: the ranking without storage (WIN == KMAX == 0).
template <typename T, typename G, typename F>
__device__ __forceinline__ void sp_each_kept(const T* plane, sp_i64 s_h,
                                             sp_i64 s_w, const G& g, int h0,
                                             int w0, T pad_value, int m,
                                             F f) {
    for (int i = 0; i < g.kh; ++i) {
        for (int j = 0; j < g.kw; ++j) {
            T v = T(0);
            if (!sp_load(plane, s_h, s_w, g, h0 + i * g.dh, w0 + j * g.dw,
                         pad_value, v)) {
                continue;
            }
            const int rank = sp_rank_in_window(plane, s_h, s_w, g, h0, w0,
                                               pad_value, v, i * g.kw + j,
                                               m);
            if (rank < m) f(rank, v);
        }
    }
}

// Registers needed to hold the ranked values of a window.
template <int WIN, int KMAX>
struct SpCapacity {
    enum { value = WIN > 0 ? WIN : (KMAX > 0 ? KMAX : 1) };
};

// Compare-exchange on keys: afterwards slot a outranks slot b. A key with
// scan position >= WIN is not part of the window and ranks below all.
template <typename T, int WIN>
__device__ __forceinline__ void sp_order(T& va, int& sa, T& vb, int& sb) {
    const bool a_out = sa >= WIN;
    const bool b_out = sb >= WIN;
    const bool swap =
        (a_out != b_out) ? a_out : sp_ranks_above(vb, sb, va, sa);
    if (swap) {
        const T tv = va; va = vb; vb = tv;
        const int ts = sa; sa = sb; sb = ts;
    }
}

template <typename T, int WIN>
struct SpNetwork {
    // Odd-even transposition sort: WIN rounds of neighbour exchanges; every
    // index is a compile-time constant after unrolling, so keys stay in
    // registers.
    __device__ __forceinline__ static void sort(T (&v)[WIN], int (&s)[WIN]) {
#pragma unroll
        for (int round = 0; round < WIN; ++round) {
#pragma unroll
            for (int a = round & 1; a + 1 < WIN; a += 2) {
                sp_order<T, WIN>(v[a], s[a], v[a + 1], s[a + 1]);
            }
        }
    }
};

template <typename T>
struct SpNetwork<T, 4> {
    // The optimal 5-comparator network for 4 keys (2x2 windows).
    __device__ __forceinline__ static void sort(T (&v)[4], int (&s)[4]) {
        sp_order<T, 4>(v[0], s[0], v[1], s[1]);
        sp_order<T, 4>(v[2], s[2], v[3], s[3]);
        sp_order<T, 4>(v[0], s[0], v[2], s[2]);
        sp_order<T, 4>(v[1], s[1], v[3], s[3]);
        sp_order<T, 4>(v[1], s[1], v[2], s[2]);
    }
};

// Insert value v at scan position p into the top list (top, pos) of
// `kept` entries, at most k <= KMAX; a later value moves up only past
// values it strictly outranks, so ties keep scan order.
template <typename T, int KMAX>
__device__ __forceinline__ void sp_insert(T v, int p, int k, int& kept,
                                          T (&top)[KMAX], int (&pos)[KMAX]) {
    // Once v takes a slot, every later slot shifts down one.
    bool shifting = false;
#pragma unroll
    for (int r = 0; r < KMAX; ++r) {
        if (r < k) {
            if (shifting || r >= kept || sp_value_above(v, top[r])) {
                const T tv = top[r];
                const int tp = pos[r];
                top[r] = v;
                pos[r] = p;
                v = tv;
                p = tp;
                shifting = true;
            }
        }
    }
    kept += kept < k;
}

// Rank the window at (h0, w0): top[r], pos[r] for r < m hold the value and
// scan position of rank r; returns m = min(k, n_o). Not for WIN == KMAX == 0.
template <typename T, int WIN, int KMAX, typename G>
__device__ __forceinline__ int sp_select_top(
    const T* plane, sp_i64 s_h, sp_i64 s_w, const G& g, int h0,
    int w0, T pad_value, T (&top)[SpCapacity<WIN, KMAX>::value],
    int (&pos)[SpCapacity<WIN, KMAX>::value]) {
    if constexpr (WIN > 0) {
        int usable = 0;
#pragma unroll
        for (int q = 0; q < WIN; ++q) {
            const int i = q / g.kw;
            const int j = q - i * g.kw;
            T v = T(0);
            const bool ok = sp_load(plane, s_h, s_w, g, h0 + i * g.dh,
                                    w0 + j * g.dw, pad_value, v);
            top[q] = ok ? v : T(0);
            pos[q] = ok ? q : q + WIN;
            usable += ok;
        }
        SpNetwork<T, WIN>::sort(top, pos);
        return sp_min(g.k, usable);
    } else {
        const int k = g.k;
        int kept = 0;
#pragma unroll
        for (int r = 0; r < KMAX; ++r) {
            top[r] = T(0);
            pos[r] = 0;
        }
        for (int i = 0; i < g.kh; ++i) {
            for (int j = 0; j < g.kw; ++j) {
                T v = T(0);
                if (!sp_load(plane, s_h, s_w, g, h0 + i * g.dh,
                             w0 + j * g.dw, pad_value, v)) {
                    continue;
                }
                sp_insert<T, KMAX>(v, i * g.kw + j, k, kept, top, pos);
            }
        }
        return kept;
    }
}

// The KS x KS window (stride-free part of SpFixed: dilation 1) at (h0, w0)
// of V neighbouring channels, every tap loaded once: vals[q] at scan
// position q, ok[q] whether that position is part of the window, as sp_load
// decides (vals[q] is zero where it is not, pad_value in padding).
template <typename T, int V, int KS, typename G>
__device__ __forceinline__ void sp_load_window(
    const T* plane, sp_i64 s_h, sp_i64 s_w, const G& g, int h0, int w0,
    T pad_value, SpVec<T, V> (&vals)[KS * KS], bool (&ok)[KS * KS]) {
#pragma unroll
    for (int i = 0; i < KS; ++i) {
        const int h = h0 + i;
#pragma unroll
        for (int j = 0; j < KS; ++j) {
            const int col = w0 + j;
            const int q = i * KS + j;
            if (h >= 0 && h < g.H && col >= 0 && col < g.W) {
                vals[q] = sp_vload<T, V>(plane + h * s_h + col * s_w);
                ok[q] = true;
            } else {
                ok[q] = g.has_pad && h >= -g.pt && h < g.H + g.pb &&
                        col >= -g.pl && col < g.W + g.pr;
                vals[q] = sp_vfill<T, V>(ok[q] ? pad_value : T(0));
            }
        }
    }
}

// sp_select_top on values already loaded (vals, ok as sp_load_window gives
// them for one channel): the same keys in the same order, so the same top
// and pos. Not for WIN == KMAX == 0.
template <typename T, int WIN, int KMAX, int NT>
__device__ __forceinline__ int sp_select_loaded(
    const T (&vals)[NT], const bool (&ok)[NT], int k,
    T (&top)[SpCapacity<WIN, KMAX>::value],
    int (&pos)[SpCapacity<WIN, KMAX>::value]) {
    static_assert(WIN > 0 || KMAX > 0, "no storage to rank into");
    if constexpr (WIN > 0) {
        static_assert(WIN == NT, "a network ranks the whole window");
        int usable = 0;
#pragma unroll
        for (int q = 0; q < WIN; ++q) {
            top[q] = ok[q] ? vals[q] : T(0);
            pos[q] = ok[q] ? q : q + WIN;
            usable += ok[q];
        }
        SpNetwork<T, WIN>::sort(top, pos);
        return sp_min(k, usable);
    } else {
        int kept = 0;
#pragma unroll
        for (int r = 0; r < KMAX; ++r) {
            top[r] = T(0);
            pos[r] = 0;
        }
#pragma unroll
        for (int q = 0; q < NT; ++q) {
            if (ok[q]) sp_insert<T, KMAX>(vals[q], q, k, kept, top, pos);
        }
        return kept;
    }
}

// Lane l of V loaded channel vectors.
template <typename T, int V, int NT>
__device__ __forceinline__ void sp_lane(const SpVec<T, V> (&vals)[NT], int l,
                                        T (&lane)[NT]) {
#pragma unroll
    for (int q = 0; q < NT; ++q) lane[q] = vals[q].v[l];
}

// Rank channel l of a loaded window (sp_select_loaded on its lane).
template <typename T, int WIN, int KMAX, int V, int NT, int CAP>
__device__ __forceinline__ int sp_select_lane(const SpVec<T, V> (&vals)[NT],
                                              const bool (&ok)[NT], int l,
                                              int k, T (&top)[CAP],
                                              int (&pos)[CAP]) {
    T lane[NT];
    sp_lane(vals, l, lane);
    return sp_select_loaded<T, WIN, KMAX>(lane, ok, k, top, pos);
}

// The rank weights of weight row cw for windows keeping m ranks.
template <typename T>
__device__ __forceinline__ const T* sp_weights(const T* table, int cw, int k,
                                               int m) {
    return table + ((sp_i64)cw * (k + 1) + m) * k;
}

// dL/dx of channel l of a window that owns its inputs: go * p[r] at the
// scan position of rank r < m, zero at every other position.
template <typename T, int V, int NT, int CAP>
__device__ __forceinline__ void sp_owned_lane(T go, const T* p, int m,
                                              const int (&pos)[CAP], int l,
                                              SpVec<T, V> (&res)[NT]) {
#pragma unroll
    for (int q = 0; q < NT; ++q) {
        T value = T(0);
#pragma unroll
        for (int r = 0; r < CAP; ++r) {
            if (r < m && pos[r] == q) value = go * p[r];
        }
        res[q].v[l] = value;
    }
}

// ---------------------------------------------------------------------------
// Rank weights: table[cw, m, r] for every number of kept ranks m (row 0 and
// r >= m are zero), from logits w (cw_count, k) in float64, as
// sortpool_ref._checks.softmax_table computes them.

template <typename T>
__global__ void sortpool_rank_weights(const double* __restrict__ w,
                                      int cw_count, int k, int raw,
                                      T* __restrict__ table,
                                      double* __restrict__ table64) {
    const sp_i64 total = (sp_i64)cw_count * (k + 1);
    for (sp_i64 t = sp_first_index(); t < total; t += sp_index_step()) {
        const int m = (int)(t % (k + 1));
        const sp_i64 cw = t / (k + 1);
        const double* wc = w + cw * k;
        T* row = table + t * k;
        double* row64 = table64 + t * k;
        for (int r = 0; r < k; ++r) row64[r] = 0.0;
        if (m > 0) {
            if (raw) {
                for (int r = 0; r < m; ++r) row64[r] = wc[r];
            } else {
                // max that propagates NaN, as numpy's max does
                double top = wc[0];
                for (int r = 1; r < m; ++r) {
                    if (wc[r] > top || wc[r] != wc[r]) top = wc[r];
                }
                double sum = 0.0;
                for (int r = 0; r < m; ++r) {
                    row64[r] = exp(wc[r] - top);
                    sum += row64[r];
                }
                for (int r = 0; r < m; ++r) row64[r] = row64[r] / sum;
            }
        }
        for (int r = 0; r < k; ++r) row[r] = (T)row64[r];
    }
}

// ---------------------------------------------------------------------------
// Forward: one output per loop step; y = sum_{r < m} p[cw, m, r] * a(r).
//
// The forward, the owned backward and the weight-gradient pass take KS, ST
// (SpFixed: 0, 0 for any geometry) and V: with KS > 0 a loop step loads its
// whole window once (sp_load_window) for V neighbouring channels (V > 1:
// channels contiguous and vector-aligned in every array), then ranks each
// channel as the general path does, so that both give the same bits. The
// cells backward exists only with KS > 0; the gather only without.

#define SP_STRIDES(p) sp_i64 p##_n, sp_i64 p##_h, sp_i64 p##_w, sp_i64 p##_c

template <typename T, int WIN, int KMAX, int KS = 0, int ST = 0, int V = 1>
__global__ void sortpool_forward(const T* __restrict__ x, SP_STRIDES(xs),
                                 const T* __restrict__ table, int per_channel,
                                 SP_GEOMETRY_PARAMS, T pad_value,
                                 int channels_inner, T* __restrict__ y,
                                 SP_STRIDES(ys)) {
    static_assert(KS > 0 || V == 1, "channel vectors need a fixed window");
    const SpFixed<KS, ST> g{SP_GEOMETRY_INIT};
    const int groups = g.C / V;
    const sp_i64 total = (sp_i64)g.N * groups * g.out_h * g.out_w;
    for (sp_i64 t = sp_first_index(); t < total; t += sp_index_step()) {
        int n, cg, oh, ow;
        sp_split(t, channels_inner, groups, g.out_h, g.out_w, n, cg, oh, ow);
        const int c = cg * V;
        const T* plane = x + n * xs_n + c * xs_c;
        const int h0 = oh * g.sh - g.pt;
        const int w0 = ow * g.sw - g.pl;
        T* out = y + n * ys_n + oh * ys_h + ow * ys_w + c * ys_c;
        if constexpr (KS > 0) {
            constexpr int NT = KS * KS;
            constexpr int CAP = SpCapacity<WIN, KMAX>::value;
            SpVec<T, V> vals[NT];
            bool ok[NT];
            sp_load_window<T, V, KS>(plane, xs_h, xs_w, g, h0, w0, pad_value,
                                     vals, ok);
            SpVec<T, V> res;
#pragma unroll
            for (int l = 0; l < V; ++l) {
                T top[CAP];
                int pos[CAP];
                const int m = sp_select_lane<T, WIN, KMAX>(vals, ok, l, g.k,
                                                           top, pos);
                const T* p =
                    sp_weights(table, per_channel ? c + l : 0, g.k, m);
                T acc = p[0] * top[0];
#pragma unroll
                for (int r = 1; r < CAP; ++r) {
                    if (r < m) acc += p[r] * top[r];
                }
                res.v[l] = acc;
            }
            sp_vstore(out, res);
        } else {
            const T* tab =
                table + (sp_i64)(per_channel ? c : 0) * (g.k + 1) * g.k;
            T acc;
            if constexpr (WIN == 0 && KMAX == 0) {
                const int m = sp_kept_ranks(g, h0, w0);
                const T* p = tab + (sp_i64)m * g.k;
                acc = T(0);
                sp_each_kept(plane, xs_h, xs_w, g, h0, w0, pad_value, m,
                             [&](int rank, T v) { acc += p[rank] * v; });
            } else {
                constexpr int CAP = SpCapacity<WIN, KMAX>::value;
                T top[CAP];
                int pos[CAP];
                const int m = sp_select_top<T, WIN, KMAX>(
                    plane, xs_h, xs_w, g, h0, w0, pad_value, top, pos);
                const T* p = tab + (sp_i64)m * g.k;
                acc = p[0] * top[0];
#pragma unroll
                for (int r = 1; r < CAP; ++r) {
                    if (r < m) acc += p[r] * top[r];
                }
            }
            *out = acc;
        }
    }
}

// ---------------------------------------------------------------------------
// Backward, dL/dx where every input lies in exactly one window (windows do
// not overlap and cover the input): the step of a window ranks it once and
// writes every real position of it, kept rank or zero.

template <typename T, int WIN, int KMAX, int KS = 0, int ST = 0, int V = 1>
__global__ void sortpool_backward_x_owned(
    const T* __restrict__ x, SP_STRIDES(xs), const T* __restrict__ gy,
    SP_STRIDES(gs), const T* __restrict__ table, int per_channel,
    SP_GEOMETRY_PARAMS, T pad_value, int channels_inner, T* __restrict__ gx,
    SP_STRIDES(gxs)) {
    static_assert(KS > 0 || V == 1, "channel vectors need a fixed window");
    const SpFixed<KS, ST> g{SP_GEOMETRY_INIT};
    const int groups = g.C / V;
    const sp_i64 total = (sp_i64)g.N * groups * g.out_h * g.out_w;
    for (sp_i64 t = sp_first_index(); t < total; t += sp_index_step()) {
        int n, cg, oh, ow;
        sp_split(t, channels_inner, groups, g.out_h, g.out_w, n, cg, oh, ow);
        const int c = cg * V;
        const T* plane = x + n * xs_n + c * xs_c;
        T* out = gx + n * gxs_n + c * gxs_c;
        const T* gop = gy + n * gs_n + oh * gs_h + ow * gs_w + c * gs_c;
        const int h0 = oh * g.sh - g.pt;
        const int w0 = ow * g.sw - g.pl;
        if constexpr (KS > 0) {
            constexpr int NT = KS * KS;
            constexpr int CAP = SpCapacity<WIN, KMAX>::value;
            SpVec<T, V> vals[NT];
            bool ok[NT];
            sp_load_window<T, V, KS>(plane, xs_h, xs_w, g, h0, w0, pad_value,
                                     vals, ok);
            const SpVec<T, V> go = sp_vload<T, V>(gop);
            SpVec<T, V> res[NT];
#pragma unroll
            for (int l = 0; l < V; ++l) {
                T top[CAP];
                int pos[CAP];
                const int m = sp_select_lane<T, WIN, KMAX>(vals, ok, l, g.k,
                                                           top, pos);
                sp_owned_lane(go.v[l],
                              sp_weights(table, per_channel ? c + l : 0, g.k,
                                         m),
                              m, pos, l, res);
            }
#pragma unroll
            for (int q = 0; q < NT; ++q) {
                const int h = h0 + q / KS;
                const int col = w0 + q % KS;
                if (h >= 0 && h < g.H && col >= 0 && col < g.W) {
                    sp_vstore(out + h * gxs_h + col * gxs_w, res[q]);
                }
            }
        } else {
            const T go = *gop;
            const T* tab =
                table + (sp_i64)(per_channel ? c : 0) * (g.k + 1) * g.k;
            if constexpr (WIN == 0 && KMAX == 0) {
                const int m = sp_kept_ranks(g, h0, w0);
                const T* p = tab + (sp_i64)m * g.k;
                for (int i = 0; i < g.kh; ++i) {
                    const int h = h0 + i * g.dh;
                    if (h < 0 || h >= g.H) continue;
                    for (int j = 0; j < g.kw; ++j) {
                        const int col = w0 + j * g.dw;
                        if (col < 0 || col >= g.W) continue;
                        const T v = plane[h * xs_h + col * xs_w];
                        const int rank = sp_rank_in_window(
                            plane, xs_h, xs_w, g, h0, w0, pad_value, v,
                            i * g.kw + j, m);
                        out[h * gxs_h + col * gxs_w] =
                            rank < m ? go * p[rank] : T(0);
                    }
                }
            } else {
                constexpr int CAP = SpCapacity<WIN, KMAX>::value;
                T top[CAP];
                int pos[CAP];
                const int m = sp_select_top<T, WIN, KMAX>(
                    plane, xs_h, xs_w, g, h0, w0, pad_value, top, pos);
                const T* p = tab + (sp_i64)m * g.k;
                for (int i = 0; i < g.kh; ++i) {
                    const int h = h0 + i * g.dh;
                    if (h < 0 || h >= g.H) continue;
                    for (int j = 0; j < g.kw; ++j) {
                        const int col = w0 + j * g.dw;
                        if (col < 0 || col >= g.W) continue;
                        const int s = i * g.kw + j;
                        T value = T(0);
#pragma unroll
                        for (int r = 0; r < CAP; ++r) {
                            if (r < m && pos[r] == s) value = go * p[r];
                        }
                        out[h * gxs_h + col * gxs_w] = value;
                    }
                }
            }
        }
    }
}

// Backward, dL/dx where windows overlap (or leave inputs uncovered): each
// input gathers over the windows that contain it, in the order of
// increasing (oh, ow) as the Numba engine accumulates, using its rank in
// each. Every input is written exactly once.

template <typename T>
__global__ void sortpool_backward_x_gather(
    const T* __restrict__ x, SP_STRIDES(xs), const T* __restrict__ gy,
    SP_STRIDES(gs), const T* __restrict__ table, int per_channel,
    SP_GEOMETRY_PARAMS, T pad_value, int channels_inner, T* __restrict__ gx,
    SP_STRIDES(gxs)) {
    const SpGeometry g = SP_GEOMETRY_INIT;
    const sp_i64 total = (sp_i64)g.N * g.C * g.H * g.W;
    for (sp_i64 t = sp_first_index(); t < total; t += sp_index_step()) {
        int n, c, h, col;
        sp_split(t, channels_inner, g.C, g.H, g.W, n, c, h, col);
        const T* plane = x + n * xs_n + c * xs_c;
        const T* gplane = gy + n * gs_n + c * gs_c;
        const T v = plane[h * xs_h + col * xs_w];
        const T* tab =
            table + (sp_i64)(per_channel ? c : 0) * (g.k + 1) * g.k;
        T acc = T(0);
        for (int i = g.kh - 1; i >= 0; --i) {
            const int th = h + g.pt - i * g.dh;
            if (th < 0 || th % g.sh != 0) continue;
            const int oh = th / g.sh;
            if (oh >= g.out_h) continue;
            const int h0 = oh * g.sh - g.pt;
            for (int j = g.kw - 1; j >= 0; --j) {
                const int tw = col + g.pl - j * g.dw;
                if (tw < 0 || tw % g.sw != 0) continue;
                const int ow = tw / g.sw;
                if (ow >= g.out_w) continue;
                const int w0 = ow * g.sw - g.pl;
                const int m = sp_kept_ranks(g, h0, w0);
                const int rank = sp_rank_in_window(plane, xs_h, xs_w, g, h0,
                                                   w0, pad_value, v,
                                                   i * g.kw + j, m);
                if (rank < m) {
                    acc += gplane[oh * gs_h + ow * gs_w] *
                           tab[(sp_i64)m * g.k + rank];
                }
            }
        }
        gx[n * gxs_n + h * gxs_h + col * gxs_w + c * gxs_c] = acc;
    }
}

// Backward, dL/dx of overlapping windows, fixed geometries: one step per
// cell of ST x ST inputs (rows a * ST - pt + u, columns b * ST - pl + v,
// u, v < ST) and V channels. The windows that contain any input of cell
// (a, b) are (oh, ow) with a - WR < oh <= a and b - WR < ow <= b; the step
// loads each of them once and adds its share to every input of the cell it
// contains, windows in increasing (oh, ow) as the gather does, so that both
// give the same bits. Every input lies in one cell and is written once.

template <typename T, int KS, int ST, int V>
__global__ void sortpool_backward_x_cells(
    const T* __restrict__ x, SP_STRIDES(xs), const T* __restrict__ gy,
    SP_STRIDES(gs), const T* __restrict__ table, int per_channel,
    SP_GEOMETRY_PARAMS, T pad_value, int channels_inner, T* __restrict__ gx,
    SP_STRIDES(gxs)) {
    static_assert(KS > 0 && ST > 0, "cells need a fixed geometry");
    constexpr int WR = (KS - 1) / ST + 1;  // windows per axis over a cell
    constexpr int NT = KS * KS;
    const SpFixed<KS, ST> g{SP_GEOMETRY_INIT};
    const int groups = g.C / V;
    const int cell_rows = (g.H + g.pt + ST - 1) / ST;
    const int cell_cols = (g.W + g.pl + ST - 1) / ST;
    const sp_i64 total = (sp_i64)g.N * groups * cell_rows * cell_cols;
    for (sp_i64 t = sp_first_index(); t < total; t += sp_index_step()) {
        int n, cg, a, b;
        sp_split(t, channels_inner, groups, cell_rows, cell_cols, n, cg, a,
                 b);
        const int c = cg * V;
        const T* plane = x + n * xs_n + c * xs_c;
        const T* gplane = gy + n * gs_n + c * gs_c;
        SpVec<T, V> acc[ST][ST];
#pragma unroll
        for (int u = 0; u < ST; ++u) {
#pragma unroll
            for (int v = 0; v < ST; ++v) acc[u][v] = sp_vfill<T, V>(T(0));
        }
#pragma unroll
        for (int dy = 0; dy < WR; ++dy) {
            const int oh = a - (WR - 1) + dy;
            if (oh < 0 || oh >= g.out_h) continue;
#pragma unroll
            for (int dx = 0; dx < WR; ++dx) {
                const int ow = b - (WR - 1) + dx;
                if (ow < 0 || ow >= g.out_w) continue;
                const int h0 = oh * ST - g.pt;
                const int w0 = ow * ST - g.pl;
                SpVec<T, V> vals[NT];
                bool ok[NT];
                sp_load_window<T, V, KS>(plane, xs_h, xs_w, g, h0, w0,
                                         pad_value, vals, ok);
                int usable = 0;
#pragma unroll
                for (int q = 0; q < NT; ++q) usable += ok[q];
                const int m = sp_min(g.k, usable);
                const SpVec<T, V> go =
                    sp_vload<T, V>(gplane + oh * gs_h + ow * gs_w);
#pragma unroll
                for (int u = 0; u < ST; ++u) {
                    const int i = (WR - 1 - dy) * ST + u;  // tap row
                    const int h = a * ST - g.pt + u;
                    if (i >= KS || h < 0 || h >= g.H) continue;
#pragma unroll
                    for (int v = 0; v < ST; ++v) {
                        const int j = (WR - 1 - dx) * ST + v;
                        const int col = b * ST - g.pl + v;
                        if (j >= KS || col < 0 || col >= g.W) continue;
                        const int s = i * KS + j;
#pragma unroll
                        for (int l = 0; l < V; ++l) {
                            int rank = 0;
#pragma unroll
                            for (int q = 0; q < NT; ++q) {
                                rank += q != s && ok[q] &&
                                        sp_ranks_above(vals[q].v[l], q,
                                                       vals[s].v[l], s);
                            }
                            if (rank < m) {
                                acc[u][v].v[l] += go.v[l] * sp_weights(
                                    table, per_channel ? c + l : 0, g.k,
                                    m)[rank];
                            }
                        }
                    }
                }
            }
        }
        T* out = gx + n * gxs_n + c * gxs_c;
#pragma unroll
        for (int u = 0; u < ST; ++u) {
            const int h = a * ST - g.pt + u;
            if (h < 0 || h >= g.H) continue;
#pragma unroll
            for (int v = 0; v < ST; ++v) {
                const int col = b * ST - g.pl + v;
                if (col < 0 || col >= g.W) continue;
                sp_vstore(out + h * gxs_h + col * gxs_w, acc[u][v]);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Backward, dL/dw, pass 1: per-column partial sums, in float64, of
// g_o * a_o(r) grouped by the window's number of kept ranks m.
//
// Logical column p < C * Q belongs to channel c and handles the spatial
// windows q, q + Q, q + 2Q, ... of that channel, in that order. Its sums go
// to partials[cw][m * k + r - first_row][col] (cols = Q columns per row
// with per-channel weights, C * Q with shared ones), which it alone writes:
// no atomics, and a result that depends on Q but not on the launch
// geometry. The buffer must be zeroed by the caller. first_row is 0, or
// k * k where no window keeps fewer than k ranks (only the rows of m = k
// are stored).
//
// With write_gx (fixed geometries whose windows own their inputs), the
// step of a window also writes its inputs' dL/dx as
// sortpool_backward_x_owned does: one pass over x and grad_y for both.

template <typename T, int WIN, int KMAX, int KS = 0, int ST = 0, int V = 1>
__global__ void sortpool_grad_w_partials(
    const T* __restrict__ x, SP_STRIDES(xs), const T* __restrict__ gy,
    SP_STRIDES(gs), int per_channel, SP_GEOMETRY_PARAMS, T pad_value,
    int channels_inner, sp_i64 columns_per_channel,
    double* __restrict__ partials, sp_i64 first_row,
    const T* __restrict__ table, int write_gx, T* __restrict__ gx,
    SP_STRIDES(gxs)) {
    static_assert(KS > 0 || V == 1, "channel vectors need a fixed window");
    const SpFixed<KS, ST> g{SP_GEOMETRY_INIT};
    const sp_i64 Q = columns_per_channel;
    const int groups = g.C / V;
    // V columns (of V neighbouring channels, same q) per loop step
    const sp_i64 steps = (sp_i64)groups * Q;
    const sp_i64 cols = per_channel ? Q : (sp_i64)g.C * Q;
    // rows of one weight row cw in partials
    const sp_i64 slots = (sp_i64)(g.k + 1) * g.k - first_row;
    const sp_i64 windows = (sp_i64)g.N * g.out_h * g.out_w;
    constexpr int CAP = SpCapacity<WIN, KMAX>::value;
    for (sp_i64 p = sp_first_index(); p < steps; p += sp_index_step()) {
        const int c = V * (int)(channels_inner ? p % groups : p / Q);
        const sp_i64 q = channels_inner ? p / groups : p % Q;
        // Column c * Q + q whichever axis neighbouring threads take
        // (channels_inner), so that the column sums, and grad_w to the last
        // bit, do not depend on the memory order of x.
        double* part = partials + (per_channel ? (sp_i64)c * slots * cols : 0)
                       + (per_channel ? q : (sp_i64)c * Q + q);
        // channel c + l's column is part + l * lane_step
        const sp_i64 lane_step = per_channel ? slots * cols : Q;
        if constexpr (KS > 0) {
            constexpr int NT = KS * KS;
            // Sums of the windows that keep all k ranks (all but some
            // border windows) stay in registers.
            double full[V][CAP];
#pragma unroll
            for (int l = 0; l < V; ++l) {
#pragma unroll
                for (int r = 0; r < CAP; ++r) full[l][r] = 0.0;
            }
            for (sp_i64 s = q; s < windows; s += Q) {
                const int ow = (int)(s % g.out_w);
                const sp_i64 rest = s / g.out_w;
                const int oh = (int)(rest % g.out_h);
                const int n = (int)(rest / g.out_h);
                const T* plane = x + n * xs_n + c * xs_c;
                const SpVec<T, V> go = sp_vload<T, V>(
                    gy + n * gs_n + oh * gs_h + ow * gs_w + c * gs_c);
                const int h0 = oh * ST - g.pt;
                const int w0 = ow * ST - g.pl;
                SpVec<T, V> vals[NT];
                bool ok[NT];
                sp_load_window<T, V, KS>(plane, xs_h, xs_w, g, h0, w0,
                                         pad_value, vals, ok);
                SpVec<T, V> res[NT];
#pragma unroll
                for (int l = 0; l < V; ++l) {
                    T top[CAP];
                    int pos[CAP];
                    const int m = sp_select_lane<T, WIN, KMAX>(
                        vals, ok, l, g.k, top, pos);
                    const double gol = (double)go.v[l];
                    if (write_gx) {
                        sp_owned_lane(go.v[l],
                                      sp_weights(table,
                                                 per_channel ? c + l : 0,
                                                 g.k, m),
                                      m, pos, l, res);
                    }
                    if (m == g.k) {
#pragma unroll
                        for (int r = 0; r < CAP; ++r) {
                            if (r < m) full[l][r] += gol * (double)top[r];
                        }
                    } else {
                        double* pl = part + l * lane_step;
#pragma unroll
                        for (int r = 0; r < CAP; ++r) {
                            if (r < m) {
                                const sp_i64 row = (sp_i64)m * g.k + r;
                                pl[(row - first_row) * cols] +=
                                    gol * (double)top[r];
                            }
                        }
                    }
                }
                if (write_gx) {
                    T* out = gx + n * gxs_n + c * gxs_c;
#pragma unroll
                    for (int u = 0; u < NT; ++u) {
                        const int h = h0 + u / KS;
                        const int col = w0 + u % KS;
                        if (h >= 0 && h < g.H && col >= 0 && col < g.W) {
                            sp_vstore(out + h * gxs_h + col * gxs_w, res[u]);
                        }
                    }
                }
            }
#pragma unroll
            for (int l = 0; l < V; ++l) {
#pragma unroll
                for (int r = 0; r < CAP; ++r) {
                    if (r < g.k) {
                        const sp_i64 row = (sp_i64)g.k * g.k + r;
                        part[l * lane_step + (row - first_row) * cols] =
                            full[l][r];
                    }
                }
            }
        } else {
            // Sums of the windows that keep all k ranks (all but some
            // border windows) stay in registers.
            double full[CAP];
#pragma unroll
            for (int r = 0; r < CAP; ++r) full[r] = 0.0;
            for (sp_i64 s = q; s < windows; s += Q) {
                const int ow = (int)(s % g.out_w);
                const sp_i64 rest = s / g.out_w;
                const int oh = (int)(rest % g.out_h);
                const int n = (int)(rest / g.out_h);
                const T* plane = x + n * xs_n + c * xs_c;
                const double go =
                    (double)gy[n * gs_n + oh * gs_h + ow * gs_w + c * gs_c];
                const int h0 = oh * g.sh - g.pt;
                const int w0 = ow * g.sw - g.pl;
                if constexpr (WIN == 0 && KMAX == 0) {
                    const int m = sp_kept_ranks(g, h0, w0);
                    sp_each_kept(plane, xs_h, xs_w, g, h0, w0, pad_value, m,
                                 [&](int rank, T v) {
                                     const sp_i64 row =
                                         (sp_i64)m * g.k + rank;
                                     part[(row - first_row) * cols] +=
                                         go * (double)v;
                                 });
                } else {
                    T top[CAP];
                    int pos[CAP];
                    const int m = sp_select_top<T, WIN, KMAX>(
                        plane, xs_h, xs_w, g, h0, w0, pad_value, top, pos);
                    if (m == g.k) {
#pragma unroll
                        for (int r = 0; r < CAP; ++r) {
                            if (r < m) full[r] += go * (double)top[r];
                        }
                    } else {
#pragma unroll
                        for (int r = 0; r < CAP; ++r) {
                            if (r < m) {
                                const sp_i64 row = (sp_i64)m * g.k + r;
                                part[(row - first_row) * cols] +=
                                    go * (double)top[r];
                            }
                        }
                    }
                }
            }
            if constexpr (!(WIN == 0 && KMAX == 0)) {
#pragma unroll
                for (int r = 0; r < CAP; ++r) {
                    if (r < g.k) {
                        const sp_i64 row = (sp_i64)g.k * g.k + r;
                        part[(row - first_row) * cols] = full[r];
                    }
                }
            }
        }
    }
}

// dL/dw, pass 2 (repeated until one column is left): dst[row][j] is the sum
// of src[row][j + u * dst_cols] over u, in increasing u, with
// dst_cols = ceil(cols / group).
__global__ void sortpool_sum_columns(const double* __restrict__ src,
                                     sp_i64 rows, sp_i64 cols, sp_i64 group,
                                     double* __restrict__ dst) {
    const sp_i64 dst_cols = (cols + group - 1) / group;
    const sp_i64 total = rows * dst_cols;
    for (sp_i64 t = sp_first_index(); t < total; t += sp_index_step()) {
        const sp_i64 row = t / dst_cols;
        const sp_i64 j = t - row * dst_cols;
        const double* in = src + row * cols;
        double acc = 0.0;
        for (sp_i64 i = j; i < cols; i += dst_cols) acc += in[i];
        dst[t] = acc;
    }
}

// dL/dw, last pass: per weight row cw, from G = sums[cw][m][r]:
// raw: sum_m G^(m); softmax: sum_m p^(m) * (G^(m) - <p^(m), G^(m)>),
// as sortpool_ref._checks.weight_grad_from_partials computes it. sums holds
// the rows m * k + r >= first_row of each cw; the others are zero.
__global__ void sortpool_grad_w_finish(const double* __restrict__ sums,
                                       sp_i64 first_row,
                                       const double* __restrict__ table64,
                                       int cw_count, int k, int raw,
                                       double* __restrict__ grad_w) {
    for (sp_i64 cw = sp_first_index(); cw < cw_count; cw += sp_index_step()) {
        const sp_i64 slots = (sp_i64)(k + 1) * k;
        const double* G = sums + cw * (slots - first_row);
        const double* P = table64 + cw * slots;
        double* out = grad_w + cw * k;
        for (int r = 0; r < k; ++r) out[r] = 0.0;
        for (int m = 1; m <= k; ++m) {
            const sp_i64 row = (sp_i64)m * k;
            const double* Pm = P + row;
            if (raw) {
                for (int r = 0; r < k; ++r) {
                    const double gm =
                        row + r >= first_row ? G[row + r - first_row] : 0.0;
                    out[r] += gm;
                }
            } else {
                double dot = 0.0;
                for (int r = 0; r < k; ++r) {
                    const double gm =
                        row + r >= first_row ? G[row + r - first_row] : 0.0;
                    dot += Pm[r] * gm;
                }
                for (int r = 0; r < k; ++r) {
                    const double gm =
                        row + r >= first_row ? G[row + r - first_row] : 0.0;
                    out[r] += Pm[r] * (gm - dot);
                }
            }
        }
    }
}
