// Attention over a compressed KV cache on the CPU, reading the packed codes.
//
// Job: out = softmax(cap(q K^T * scale) + mask) V for q [B, Hq, T, D] (cap: x,
// or softcap * tanh(x / softcap); keys before a short mask hidden; a per-head
// sink logit, if given, joins the softmax's denominator), where K and
// V are a layer's stores (layout: gear_compile/store.py), without building
// the dense K/V. Built and loaded by kernels/cpu.py, which also passes the
// store descriptor (`Seg` fields below) that says where each part sits in
// the flattened part lists.
//
// Algorithm (flash-decoding on the cores):
// * A store is four segments: its exact sinks (shadowing the prefill block's
//   first tokens), the prefill block, the decode blocks, the exact buffer;
//   the call's new tokens follow.
// * Work items are (batch, KV head, split of the live tokens); the G query
//   heads of a KV head and the T query tokens are the R = G*T rows of one
//   item, so every packed byte is read and unpacked once for all of them.
// * An item walks its tokens in chunks of CHUNK: scores for the chunk, an
//   online-softmax update, then the weighted V rows. Each item keeps
//   (max, sum, acc[R][D]); items of one (batch, KV head) are merged by their
//   log-sum-exp at the end.
// * K quantized per channel (scale s_d, zero z_d per token group):
//   q.k_t = sum_d (q_d s_d) c_td + sum_d q_d z_d, so q' = q*s and q.z are
//   computed once per group and the per-token work is unpack + dot.
// * Low-rank terms take the small side first: q.(A_t B^T) = (q.B).A_t for K,
//   sum_t p_t A_t B^T = (sum_t p_t A_t) B^T for V (B is per block).
// * K outliers are per block, as tile-CSR records (outliers.py: `records`):
//   sorted by (token, channel), each a packed (token mod 256, channel)
//   position and a value, with one pointer per TILE-token record tile, so a
//   chunk reads its records as one contiguous run found by pointer loads.
//   V outliers are per token. Both are int8 counts of units of their group's
//   step, added to the codes before the scales apply (folded into q or not).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_simd.h"

namespace gear_cpu {

constexpr int CHUNK = 64;          // tokens scored per softmax update
constexpr int MIN_SPLIT = 256;     // fewest tokens worth a work item of their own
constexpr int TILE = 16;           // tokens a K-outlier pointer covers (outliers.py: TILE)
constexpr int TOKEN_BITS = 8;      // a K record's token field: its offset mod 256 (outliers.py)

// Fields of one segment's descriptor (store.py: KERNEL_FIELDS): how it is
// quantized (GROUP 0: the whole block; BLOCK 0: the whole segment; outlier
// counts in 2^-OUT_SHIFT steps), then the index of each part in the flat list
// (-1: absent). Ranks and outlier counts are read from the parts' shapes.
enum Field { EXACT, BITS, CHANNEL_AXIS, GROUP, BLOCK, OUT_SHIFT,
             CODES, SCALE, ZERO, LR_A, LR_B, LR_S, OUT_VAL, OUT_IDX, OUT_PTR, NFIELDS };
constexpr int NLENGTHS = 3;        // the lengths a store counts: prefill block, decode blocks, buffer
constexpr int NSTORE = 4;          // segments of a store: its exact sinks, then those three
constexpr int NSEG = 5;            // and the call's new tokens (exact, not yet in the store)

// ---------------------------------------------------------------- scalars
template <typename T> inline float to_f(T x) { return static_cast<float>(x); }

inline int read_index(const void* p, at::ScalarType t, int64_t i) {
  switch (t) {
    case at::kByte: return static_cast<const uint8_t*>(p)[i];
    case at::kShort: return static_cast<const int16_t*>(p)[i];
    default: return static_cast<const int32_t*>(p)[i];
  }
}

template <typename T>
inline void convert_row(const T* x, int n, float* out) {
#pragma omp simd
  for (int i = 0; i < n; ++i) out[i] = to_f(x[i]);
}

// ---------------------------------------------------------------- segments
// One segment of one store, with pointers already offset to a (batch, head).
struct Seg {
  bool exact = true, channel = false;
  int bits = 0, group = 1, block = 1, rank = 0, k2 = 0, W = 0;
  int64_t cap = 0;                             // token capacity
  const void* data = nullptr;                  // exact values, or packed codes
  at::ScalarType dtype = at::kFloat;           // of exact values
  const at::Half *scale = nullptr, *zero = nullptr;
  const int8_t* out_val = nullptr;                 // outliers, in units of their group's step
  float out_unit = 1.0f;                           // that unit, in steps
  const int8_t *lr_a = nullptr, *lr_b = nullptr;   // L = A diag(lr_s) B^T, A and B in int8
  const float* lr_s = nullptr;                     // per block, one scale per rank
  const void* out_idx = nullptr;                   // V: channels; K: packed record positions
  at::ScalarType idx_type = at::kByte;
  const int32_t* out_ptr = nullptr;                // K: per block, each record tile's first record
  int ptrs = 0;                                    // K: pointers per block (record tiles + 1)
  int channel_bits = 8;                            // K: a record's channel field (outliers.channel_bits)

  // Column k of block blk's B, times its scale: B_blk[:, k] lr_s[blk, k].
  void lr_b_column(int64_t blk, int k, int D, float* out) const {
    const int8_t* Bm = lr_b + blk * D * rank;
    const float s = lr_s[blk * rank + k];
    for (int d = 0; d < D; ++d) out[d] = static_cast<float>(Bm[d * rank + k]) * s;
  }
};

// Where one segment's parts start, and their per-(batch, head) strides.
struct SegBase {
  Seg seg;
  int64_t data_hs = 0, scale_hs = 0, a_hs = 0, b_hs = 0, s_hs = 0, ov_hs = 0, op_hs = 0;

  Seg at(int64_t head) const {
    Seg s = seg;
    size_t el = s.exact ? c10::elementSize(s.dtype) : 1;
    s.data = static_cast<const char*>(s.data) + head * data_hs * el;
    if (s.scale) { s.scale += head * scale_hs; s.zero += head * scale_hs; }
    if (s.lr_a) { s.lr_a += head * a_hs; s.lr_b += head * b_hs; s.lr_s += head * s_hs; }
    if (s.out_val) {
      s.out_val += head * ov_hs;
      s.out_idx = static_cast<const char*>(s.out_idx) + head * ov_hs * c10::elementSize(s.idx_type);
    }
    if (s.out_ptr) s.out_ptr += head * op_hs;
    return s;
  }
};

int64_t head_stride(const at::Tensor& t) { return t.numel() / (t.size(0) * t.size(1)); }

// An exact segment: values [B, H, N, D] in the model's dtype.
SegBase exact_seg(const at::Tensor& data) {
  SegBase b;
  Seg& s = b.seg;
  s.cap = data.size(2);
  s.block = static_cast<int>(std::max<int64_t>(s.cap, 1));
  s.W = static_cast<int>(data.size(3));
  s.data = data.data_ptr();
  s.dtype = data.scalar_type();
  TORCH_CHECK(s.dtype == at::kFloat || s.dtype == at::kHalf || s.dtype == at::kBFloat16,
              "gear attention_cpu: exact storage must be fp32, fp16 or bf16, got ", s.dtype);
  b.data_hs = head_stride(data);
  return b;
}

SegBase make_seg(const std::vector<at::Tensor>& parts, const int64_t* f) {
  if (f[EXACT]) return exact_seg(parts[f[CODES]]);
  SegBase b;
  Seg& s = b.seg;
  const at::Tensor& codes = parts[f[CODES]];
  TORCH_CHECK(codes.scalar_type() == at::kByte, "gear attention_cpu: codes must be uint8");
  s.exact = false;
  s.cap = codes.size(2);
  s.W = static_cast<int>(codes.size(3));
  s.data = codes.data_ptr();
  b.data_hs = head_stride(codes);
  s.bits = static_cast<int>(f[BITS]);
  s.channel = f[CHANNEL_AXIS] != 0;
  s.block = f[BLOCK] ? static_cast<int>(f[BLOCK]) : static_cast<int>(std::max<int64_t>(s.cap, 1));
  s.group = f[GROUP] ? static_cast<int>(f[GROUP]) : s.block;
  const at::Tensor& sc = parts[f[SCALE]];
  TORCH_CHECK(sc.scalar_type() == at::kHalf, "gear attention_cpu: scales must be fp16");
  s.scale = sc.data_ptr<at::Half>();
  s.zero = parts[f[ZERO]].data_ptr<at::Half>();
  b.scale_hs = head_stride(sc);
  if (f[LR_A] >= 0) {
    s.rank = static_cast<int>(parts[f[LR_A]].size(3));
    TORCH_CHECK(parts[f[LR_A]].scalar_type() == at::kChar && parts[f[LR_B]].scalar_type() == at::kChar &&
                parts[f[LR_S]].scalar_type() == at::kFloat,
                "gear attention_cpu: lr_a and lr_b must be int8, lr_s fp32");
    s.lr_a = parts[f[LR_A]].data_ptr<int8_t>();
    s.lr_b = parts[f[LR_B]].data_ptr<int8_t>();
    s.lr_s = parts[f[LR_S]].data_ptr<float>();
    b.a_hs = head_stride(parts[f[LR_A]]);
    b.b_hs = head_stride(parts[f[LR_B]]);
    b.s_hs = head_stride(parts[f[LR_S]]);
  }
  if (f[OUT_VAL] >= 0) {
    s.k2 = static_cast<int>(parts[f[OUT_IDX]].size(3));
    TORCH_CHECK(parts[f[OUT_VAL]].scalar_type() == at::kChar, "gear attention_cpu: out_val must be int8");
    s.out_val = parts[f[OUT_VAL]].data_ptr<int8_t>();
    s.out_unit = std::ldexp(1.0f, -static_cast<int>(f[OUT_SHIFT]));
    s.out_idx = parts[f[OUT_IDX]].data_ptr();
    s.idx_type = parts[f[OUT_IDX]].scalar_type();
    b.ov_hs = head_stride(parts[f[OUT_VAL]]);
  }
  if (f[OUT_PTR] >= 0) {
    TORCH_CHECK(parts[f[OUT_PTR]].scalar_type() == at::kInt, "gear attention_cpu: out_ptr must be int32");
    s.ptrs = static_cast<int>(parts[f[OUT_PTR]].size(3));
    s.out_ptr = parts[f[OUT_PTR]].data_ptr<int32_t>();
    b.op_hs = head_stride(parts[f[OUT_PTR]]);
    const int64_t D = s.channel ? sc.size(3) : sc.size(3) * s.group;   // channels
    while ((int64_t{1} << s.channel_bits) < D) ++s.channel_bits;
  }
  return b;
}

// Row t of an exact segment, as floats (the padding past D is left as it is).
inline void exact_row(const Seg& s, int64_t t, int D, float* out) {
  switch (s.dtype) {
    case at::kFloat: std::memcpy(out, static_cast<const float*>(s.data) + t * D, D * sizeof(float)); break;
    case at::kHalf: convert_row(static_cast<const at::Half*>(s.data) + t * D, D, out); break;
    default: convert_row(static_cast<const at::BFloat16*>(s.data) + t * D, D, out); break;
  }
}

// A K record's packed position (16 bits held in an int16, or int32).
inline uint32_t read_position(const Seg& s, int64_t i) {
  if (s.idx_type == at::kShort) return static_cast<uint16_t>(static_cast<const int16_t*>(s.out_idx)[i]);
  return static_cast<uint32_t>(static_cast<const int32_t*>(s.out_idx)[i]);
}

// ---------------------------------------------------------------- one work item
struct Problem {
  int B, Hq, Hkv, G, T, D, DP, R;
  bool causal;
  const float* q;                 // [B, Hq, T, D] fp32, pre-scaled
  // mask: element (b, hq, i, col) at mask + b*ms[0] + hq*ms[1] + i*ms[2] + col*ms[3]
  const void* mask = nullptr;
  at::ScalarType mask_type = at::kBool;
  int64_t ms[4] = {0, 0, 0, 0};
  int64_t mask_len = 0;
  float softcap = 0.0f;           // > 0: scores -> softcap * tanh(scores / softcap)
  const float* sinks = nullptr;   // [Hq] or null: one more logit per query head, value 0
};

// Per-thread buffers; rows of DP floats (zero padding keeps dot products exact).
struct Scratch {
  int ts;                         // tile row stride: room for DP floats or PB*W codes
  std::vector<float> q, qs, qz, qb, pa, w, score, row, tile, at, sa, za;
  Scratch(const Problem& P, int maxrank, int maxrow)
      : ts((std::max(P.DP, maxrow) + 7) / 8 * 8),
        q(P.R * P.DP, 0.0f), qs(P.R * P.DP, 0.0f), qz(P.R), qb(P.R * std::max(maxrank, 1)),
        pa(P.R * std::max(maxrank, 1)), w(P.R * CHUNK), score(P.R * CHUNK),
        row(ts, 0.0f), tile(CHUNK * ts, 0.0f), at(std::max(maxrank, 1) * CHUNK),
        sa(CHUNK), za(CHUNK) {}
  // The low-rank A rows of tokens [t0, t0+n), transposed: at[k * CHUNK + j].
  void load_a(const int8_t* lr_a, int rk, int64_t t0, int n) {
    for (int j = 0; j < n; ++j)
      for (int k = 0; k < rk; ++k) at[k * CHUNK + j] = static_cast<float>(lr_a[(t0 + j) * rk + k]);
  }
  float* tile_row(int j) { return tile.data() + j * ts; }
};

// Softmax state of the R rows of one item.
struct State {
  std::vector<float> m, l, acc;
  State(int R, int DP) : m(R, -INFINITY), l(R, 0.0f), acc(R * DP, 0.0f) {}
};

inline float mask_value(const Problem& P, int b, int hq, int i, int64_t col) {
  if (col < 0) return 0.0f;
  int64_t off = b * P.ms[0] + hq * P.ms[1] + i * P.ms[2] + col * P.ms[3];
  switch (P.mask_type) {
    case at::kBool: return static_cast<const bool*>(P.mask)[off] ? 0.0f : -INFINITY;
    case at::kFloat: return static_cast<const float*>(P.mask)[off];
    case at::kHalf: return to_f(static_cast<const at::Half*>(P.mask)[off]);
    default: return to_f(static_cast<const at::BFloat16*>(P.mask)[off]);
  }
}

// K outliers of tokens [t0, t0+n), added to the tile of codes: each is a
// signed number of units of its group's step (`outliers.steps`). A block's
// records of record tiles [j0, j1) are [ptr[j0], ptr[j1]), in token order; a
// record's token is its tile's 256-token base plus the stored low byte. Only
// a chunk starting or ending inside a record tile skips records of it.
void k_outliers(const Problem& P, const Seg& K, int64_t t0, int n, Scratch& sc) {
  const uint32_t channel_mask = (1u << K.channel_bits) - 1;
  for (int64_t t = t0; t < t0 + n;) {
    int64_t blk = t / K.block;
    int lo = static_cast<int>(t - blk * K.block);
    int hi = static_cast<int>(std::min<int64_t>(t0 + n - blk * K.block, K.block));
    const int32_t* ptr = K.out_ptr + blk * K.ptrs;
    const int64_t first = blk * K.k2;            // the block's records: k2 = 2k * D of them
    for (int j = lo / TILE; j * TILE < hi; ++j) {
      const int base = (j * TILE) & ~255;
      for (int r = ptr[j]; r < ptr[j + 1]; ++r) {
        uint32_t pos = read_position(K, first + r);
        int tok = base + static_cast<int>((pos >> K.channel_bits) & 255);
        if (tok < lo || tok >= hi) continue;
        sc.tile_row(static_cast<int>(blk * K.block + tok - t0))[pos & channel_mask] +=
            static_cast<float>(K.out_val[first + r]) * K.out_unit;
      }
    }
    t = blk * K.block + hi;
  }
}

// Tokens [t0, t0+n) of segment `s` into the tile, one row per token: the
// exact values, or the codes as floats.
void load_tile(const Seg& s, int64_t t0, int n, int D, Scratch& sc) {
  for (int j = 0; j < n; ++j) {
    int64_t t = t0 + j;
    if (s.exact) exact_row(s, t, D, sc.tile_row(j));
    else unpack_any(s.bits, static_cast<const uint8_t*>(s.data) + t * s.W, s.W, sc.tile_row(j));
  }
}

// The tile's codes (outliers' steps added) as values: codes * scale + zero.
void rebuild_tile(const Seg& s, int64_t t0, int n, int D, Scratch& sc) {
  for (int j = 0; j < n; ++j) {
    int64_t t = t0 + j;
    float* row = sc.tile_row(j);
    if (s.channel) {                       // per-channel stats of the token group
      const at::Half* sc_ = s.scale + (t / s.group) * D;
      const at::Half* z = s.zero + (t / s.group) * D;
      for (int d = 0; d < D; ++d) row[d] = row[d] * to_f(sc_[d]) + to_f(z[d]);
    } else {                               // per-token stats of each channel group
      const int ng = D / s.group;
      for (int g = 0; g < ng; ++g) {
        float a = to_f(s.scale[t * ng + g]), z = to_f(s.zero[t * ng + g]);
        for (int d = g * s.group; d < (g + 1) * s.group; ++d) row[d] = row[d] * a + z;
      }
    }
  }
}

// Scores of tokens [t0, t0+n) of a K segment into sc.score[r * CHUNK + j].
void score_chunk(const Problem& P, const Seg& K, int64_t t0, int n, Scratch& sc) {
  const int R = P.R, D = P.D, DP = P.DP;
  float* score = sc.score.data();
  const bool fold = !K.exact && K.channel;   // per-channel stats fold into q
  load_tile(K, t0, n, D, sc);
  if (K.k2) k_outliers(P, K, t0, n, sc);
  if (!fold && !K.exact) rebuild_tile(K, t0, n, D, sc);
  if (!fold) {
    score_tile(sc.q.data(), R, DP, sc.tile.data(), sc.ts, n, score, CHUNK);
  } else {                                 // q.k_t = (q*s).c_t + q.z, per token group
    for (int j0 = 0; j0 < n;) {
      int64_t group = (t0 + j0) / K.group;
      int j1 = static_cast<int>(std::min<int64_t>(n, (group + 1) * K.group - t0));
      convert_row(K.scale + group * D, D, sc.row.data());
      for (int r = 0; r < R; ++r)
        for (int d = 0; d < D; ++d) sc.qs[r * DP + d] = sc.q[r * DP + d] * sc.row[d];
      convert_row(K.zero + group * D, D, sc.row.data());
      score_tile(sc.q.data(), R, DP, sc.row.data(), 0, 1, sc.qz.data(), 1);
      score_tile(sc.qs.data(), R, DP, sc.tile_row(j0), sc.ts, j1 - j0, score + j0, CHUNK);
      for (int r = 0; r < R; ++r)
        for (int j = j0; j < j1; ++j) score[r * CHUNK + j] += sc.qz[r];
      j0 = j1;
    }
  }
  if (K.exact) return;
  if (K.rank) {                            // (q . B_blk) . A_t, a run of tokens per block
    const int rk = K.rank;
    sc.load_a(K.lr_a, rk, t0, n);
    for (int j0 = 0; j0 < n;) {
      int64_t blk = (t0 + j0) / K.block;
      int j1 = static_cast<int>(std::min<int64_t>(n, (blk + 1) * K.block - t0));
      for (int k = 0; k < rk; ++k) {
        K.lr_b_column(blk, k, D, sc.row.data());
        score_tile(sc.q.data(), R, DP, sc.row.data(), 0, 1, sc.qb.data() + k, rk);
      }
      for (int r = 0; r < R; ++r)
        for (int k = 0; k < rk; ++k)
          axpy(sc.qb[r * rk + k], sc.at.data() + k * CHUNK + j0, score + r * CHUNK + j0, j1 - j0);
      j0 = j1;
    }
  }
}

// acc_r += sum_j p[r][j] V_{t0+j}. Per-token V stats fold into the weights,
// (p*s) . c + (p.z), the zero-point sums joining acc once per chunk; the
// low-rank V term goes through (sum_t p_t A_t) B_blk^T once per block.
void value_chunk(const Problem& P, const Seg& V, int64_t t0, int n, Scratch& sc, State& st) {
  const int R = P.R, D = P.D, DP = P.DP;
  const float* p = sc.score.data();
  float* acc = st.acc.data();
  const bool fold = !V.exact && !V.channel;
  load_tile(V, t0, n, D, sc);
  for (int j = 0; j < n && V.k2; ++j)      // sparse V: 2k channels per token, steps into the codes
    for (int e = 0; e < V.k2; ++e) {
      int64_t at = (t0 + j) * V.k2 + e;
      sc.tile_row(j)[read_index(V.out_idx, V.idx_type, at)] += static_cast<float>(V.out_val[at]) * V.out_unit;
    }
  if (!fold && !V.exact) rebuild_tile(V, t0, n, D, sc);
  if (!fold) {
    accumulate_tile(p, CHUNK, R, n, sc.tile.data(), sc.ts, acc, DP, 0, DP);
  } else {
    const int ng = D / V.group;
    for (int g = 0; g < ng; ++g) {
      for (int j = 0; j < n; ++j) {
        sc.sa[j] = to_f(V.scale[(t0 + j) * ng + g]);
        sc.za[j] = to_f(V.zero[(t0 + j) * ng + g]);
      }
      for (int r = 0; r < R; ++r) {
        const float* pr = p + r * CHUNK;
        float* wr = sc.w.data() + r * CHUNK;
        for (int j = 0; j < n; ++j) wr[j] = pr[j] * sc.sa[j];
        float z = dot(pr, sc.za.data(), n);
        const int d1 = ng == 1 ? D : (g + 1) * V.group;
        for (int d = g * V.group; d < d1; ++d) acc[r * DP + d] += z;
      }
      accumulate_tile(sc.w.data(), CHUNK, R, n, sc.tile.data(), sc.ts, acc, DP,
                      g * V.group, ng == 1 ? DP : (g + 1) * V.group);
    }
  }
  if (V.exact) return;
  if (V.rank) {                            // acc += (sum_t p_t A_t) B_blk^T per block
    const int rk = V.rank;
    sc.load_a(V.lr_a, rk, t0, n);
    for (int j0 = 0; j0 < n;) {
      int64_t blk = (t0 + j0) / V.block;
      int j1 = static_cast<int>(std::min<int64_t>(n, (blk + 1) * V.block - t0));
      for (int r = 0; r < R; ++r)
        for (int k = 0; k < rk; ++k)
          sc.pa[r * rk + k] = dot(p + r * CHUNK + j0, sc.at.data() + k * CHUNK + j0, j1 - j0);
      for (int k = 0; k < rk; ++k) {
        V.lr_b_column(blk, k, D, sc.row.data());
        accumulate_tile(sc.pa.data() + k, rk, R, 1, sc.row.data(), 0, acc, DP, 0, DP);
      }
      j0 = j1;
    }
  }
}

// Tokens [t0, t0+n) of one segment: scores, mask, online softmax, values.
void attend_chunk(const Problem& P, const Seg& K, const Seg& V, int64_t t0, int n,
                  int64_t pos0, int64_t total, int b, int kvh, Scratch& sc, State& st) {
  const int R = P.R, DP = P.DP;
  score_chunk(P, K, t0, n, sc);
  for (int r = 0; r < R; ++r) {
    int g = r / P.T, i = r % P.T;
    float* s = sc.score.data() + r * CHUNK;
    if (P.softcap > 0) {                    // Gemma 2's logit soft-capping, before the mask
      for (int j = 0; j < n; ++j) s[j] = P.softcap * std::tanh(s[j] / P.softcap);
    }
    if (P.causal) {                         // query i sees keys < total - T + i + 1
      int64_t limit = total - P.T + i + 1;
      for (int j = 0; j < n; ++j) if (pos0 + t0 + j >= limit) s[j] = -INFINITY;
    }
    if (P.mask) {
      // The mask's last column is the newest key. A longer mask starts
      // before the keys; a shorter one (a sliding-window layer, whose store
      // still holds blocks older than its window) hides the keys before it.
      int64_t shift = P.mask_len - total;
      for (int j = 0; j < n; ++j) {
        int64_t col = pos0 + t0 + j + shift;
        s[j] = col < 0 ? -INFINITY : s[j] + mask_value(P, b, kvh * P.G + g, i, col);
      }
    }
    float mx = -INFINITY;
    for (int j = 0; j < n; ++j) mx = s[j] > mx ? s[j] : mx;
    float m_new = std::max(st.m[r], mx);
    float m_use = m_new == -INFINITY ? 0.0f : m_new;
    float alpha = st.m[r] == -INFINITY ? 0.0f : exp_neg(st.m[r] - m_use);
    st.l[r] = st.l[r] * alpha + exp_shifted(s, n, m_use);
    st.m[r] = m_new;
    if (alpha != 1.0f) {
      float* acc = st.acc.data() + r * DP;
      for (int d = 0; d < DP; ++d) acc[d] *= alpha;
    }
  }
  value_chunk(P, V, t0, n, sc, st);
}

// ---------------------------------------------------------------- the op
at::Tensor attention_cpu(const at::Tensor& q_in, at::TensorList k_parts, at::TensorList v_parts,
                         const c10::optional<at::Tensor>& k_new, const c10::optional<at::Tensor>& v_new,
                         const c10::optional<at::Tensor>& attn_mask, double scale, bool is_causal,
                         at::IntArrayRef k_desc, at::IntArrayRef v_desc, double softcap,
                         const c10::optional<at::Tensor>& sinks_in) {
  TORCH_CHECK(q_in.dim() == 4, "gear attention_cpu: q must be [B, Hq, T, D]");
  TORCH_CHECK(k_desc.size() == 2 + NSTORE * NFIELDS && v_desc.size() == k_desc.size(),
              "gear attention_cpu: descriptor size mismatch");
  TORCH_CHECK(k_new.has_value() == v_new.has_value(), "gear attention_cpu: k_new without v_new");
  std::vector<at::Tensor> kp(k_parts.begin(), k_parts.end()), vp(v_parts.begin(), v_parts.end());
  for (auto& t : kp) t = t.contiguous();
  for (auto& t : vp) t = t.contiguous();
  const at::Tensor& lengths = kp[k_desc[0]];
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.numel() == NLENGTHS,
              "gear attention_cpu: lengths must be int64 [3]");
  const int64_t* lens_ptr = lengths.data_ptr<int64_t>();
  at::Tensor kn = k_new.has_value() ? k_new->contiguous() : at::Tensor();
  at::Tensor vn = v_new.has_value() ? v_new->contiguous() : at::Tensor();
  // segments: sinks (their count is their tensor's length), prefill, decode, buffer, new
  const int64_t sink_len = kp[k_desc[2 + CODES]].size(2);
  int64_t lens[NSEG] = {sink_len, lens_ptr[0], lens_ptr[1], lens_ptr[2], kn.defined() ? kn.size(2) : 0};
  TORCH_CHECK(sink_len <= lens[1], "gear attention_cpu: ", sink_len, " sinks for a prefill block of ", lens[1]);

  Problem P;
  P.B = q_in.size(0); P.Hq = q_in.size(1); P.T = q_in.size(2); P.D = q_in.size(3);
  P.DP = (P.D + 7) / 8 * 8;
  P.Hkv = kp[k_desc[1]].size(1);
  TORCH_CHECK(P.Hq % P.Hkv == 0, "gear attention_cpu: query heads ", P.Hq,
              " are not a multiple of KV heads ", P.Hkv);
  P.G = P.Hq / P.Hkv;
  P.R = P.G * P.T;
  P.causal = is_causal && P.T > 1;
  P.softcap = static_cast<float>(softcap);
  at::Tensor sinks;
  if (sinks_in.has_value()) {
    sinks = sinks_in->to(at::kFloat).contiguous();
    TORCH_CHECK(sinks.numel() == P.Hq, "gear attention_cpu: sinks must hold one logit per query head (",
                P.Hq, "), got ", sinks.numel());
    P.sinks = sinks.data_ptr<float>();
  }
  at::Tensor q = q_in.to(at::kFloat).mul(scale).contiguous();
  P.q = q.data_ptr<float>();
  at::Tensor mask;
  if (attn_mask.has_value()) {
    mask = *attn_mask;
    while (mask.dim() < 4) mask = mask.unsqueeze(0);
    mask = mask.expand({P.B, P.Hq, P.T, mask.size(3)});
    P.mask = mask.data_ptr();
    P.mask_type = mask.scalar_type();
    TORCH_CHECK(P.mask_type == at::kBool || P.mask_type == at::kFloat || P.mask_type == at::kHalf ||
                P.mask_type == at::kBFloat16, "gear attention_cpu: mask must be bool or float");
    for (int i = 0; i < 4; ++i) P.ms[i] = mask.stride(i);
    P.mask_len = mask.size(3);
  }

  SegBase ks[NSEG], vs[NSEG];
  int maxrank = 1, maxrow = P.D;           // longest tile row: D values or PB*W codes
  for (int i = 0; i < NSEG; ++i) {
    if (i < NSTORE) {
      ks[i] = make_seg(kp, k_desc.data() + 2 + i * NFIELDS);
      vs[i] = make_seg(vp, v_desc.data() + 2 + i * NFIELDS);
    } else if (kn.defined()) {
      ks[i] = exact_seg(kn);
      vs[i] = exact_seg(vn);
    }
    maxrank = std::max({maxrank, ks[i].seg.rank, vs[i].seg.rank});
    for (const Seg& g : {ks[i].seg, vs[i].seg})
      maxrow = std::max(maxrow, g.exact ? g.W : (8 / std::max(g.bits, 1)) * g.W);
    TORCH_CHECK(lens[i] <= ks[i].seg.cap, "gear attention_cpu: segment ", i, " holds ", lens[i],
                " tokens, capacity ", ks[i].seg.cap);
  }
  // each segment's first key position; the sinks shadow the prefill block's
  // first tokens (the block is read from token sink_len on)
  const int64_t pos0[NSEG] = {0, 0, lens[1], lens[1] + lens[2], lens[1] + lens[2] + lens[3]};
  const int64_t first[NSEG] = {0, sink_len, 0, 0, 0};
  const int64_t total = pos0[NSEG - 1] + lens[NSEG - 1];

  // split each (batch, KV head)'s tokens so that every core has work
  const int64_t heads = static_cast<int64_t>(P.B) * P.Hkv;
  const int64_t threads = at::get_num_threads();
  // about 4 items a thread, a whole number of items a thread where the
  // tokens allow (3 KV heads on 2 threads: 4 splits, not 3, which left one
  // thread a head's split behind; measured 10-20 % at 1k-4k tokens)
  const int64_t most = std::max<int64_t>(1, total / MIN_SPLIT);
  int64_t splits = std::max<int64_t>(1, (4 * threads + heads - 1) / heads);
  while (splits < most && (heads * splits) % threads) ++splits;
  splits = std::min(splits, most);
  const int64_t per_split = (total + splits - 1) / splits;
  const int R = P.R, D = P.D, DP = P.DP;
  // partials: per item and row, (m, l, acc[DP])
  const int64_t stride = DP + 2;
  std::vector<float> part(heads * splits * R * stride);

  at::parallel_for(0, heads * splits, 1, [&](int64_t begin, int64_t end) {
    Scratch sc(P, maxrank, maxrow);
    for (int64_t item = begin; item < end; ++item) {
      int64_t head = item / splits, split = item % splits;
      int b = static_cast<int>(head / P.Hkv), kvh = static_cast<int>(head % P.Hkv);
      for (int g = 0; g < P.G; ++g)
        for (int i = 0; i < P.T; ++i)
          std::memcpy(sc.q.data() + (g * P.T + i) * DP,
                      P.q + ((static_cast<int64_t>(b) * P.Hq + kvh * P.G + g) * P.T + i) * D,
                      D * sizeof(float));
      State st(R, DP);
      int64_t lo = split * per_split, hi = std::min(total, lo + per_split);
      for (int s = 0; s < NSEG; ++s) {
        int64_t a = std::max(lo, pos0[s] + first[s]) - pos0[s];
        int64_t z = std::min(hi, pos0[s] + lens[s]) - pos0[s];
        if (a >= z) continue;
        Seg K = ks[s].at(head), V = vs[s].at(head);
        for (int64_t t = a; t < z; t += CHUNK)
          attend_chunk(P, K, V, t, static_cast<int>(std::min<int64_t>(CHUNK, z - t)),
                       pos0[s], total, b, kvh, sc, st);
      }
      float* out = part.data() + item * R * stride;
      for (int r = 0; r < R; ++r) {
        out[r * stride] = st.m[r];
        out[r * stride + 1] = st.l[r];
        std::memcpy(out + r * stride + 2, st.acc.data() + r * DP, DP * sizeof(float));
      }
    }
  });

  // merge the splits of each (batch, KV head) by their log-sum-exp, into an
  // output laid out like q (as the fake implementation promises: empty_like)
  at::Tensor out = at::empty_like(q_in, q_in.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const int64_t os[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  std::vector<float> merged(DP);
  for (int64_t head = 0; head < heads; ++head) {
    int b = static_cast<int>(head / P.Hkv), kvh = static_cast<int>(head % P.Hkv);
    for (int r = 0; r < R; ++r) {
      int g = r / P.T, i = r % P.T;
      // a sink is one more logit in the denominator, with a zero value
      float sink = P.sinks ? P.sinks[kvh * P.G + g] : -INFINITY;
      float m = sink;
      for (int64_t s = 0; s < splits; ++s) m = std::max(m, part[((head * splits + s) * R + r) * stride]);
      float m_use = m == -INFINITY ? 0.0f : m;
      float l = sink == -INFINITY ? 0.0f : std::exp(sink - m_use);
      std::fill(merged.begin(), merged.end(), 0.0f);
      for (int64_t s = 0; s < splits; ++s) {
        const float* src = part.data() + ((head * splits + s) * R + r) * stride;
        float w = src[0] == -INFINITY ? 0.0f : std::exp(src[0] - m_use);
        l += w * src[1];
        for (int d = 0; d < DP; ++d) merged[d] += w * src[2 + d];
      }
      float inv = 1.0f / l;                  // l = 0 (every key masked): NaN, as SDPA gives
      float* dst = o + b * os[0] + (kvh * P.G + g) * os[1] + i * os[2];
      for (int d = 0; d < D; ++d) dst[d * os[3]] = merged[d] * inv;
    }
  }
  return out.to(q_in.scalar_type());
}

}  // namespace gear_cpu

TORCH_LIBRARY_FRAGMENT(gear, m) {
  m.def("attention_cpu(Tensor q, Tensor[] k_parts, Tensor[] v_parts, Tensor? k_new, Tensor? v_new, "
        "Tensor? attn_mask, float scale, bool is_causal, int[] k_desc, int[] v_desc, "
        "float softcap=0., Tensor? sinks=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(gear, CPU, m) { m.impl("attention_cpu", &gear_cpu::attention_cpu); }
