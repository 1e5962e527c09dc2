// LoRC's decode attention on the CPU, K rebuilt tile by tile (gear::lorc_attention_cpu).
//
// Job: the attention of one LoRC site's decode step (passes/lorc_fused.py: `fused_attention`),
// out = softmax(q K^T * scale + mask) V, where the past K and V are latent
// stores ([B, 1, L, r], one latent a token shared by the layer's KV heads,
// under any codec the CPU kernel reads), without building the dense past:
// * K, per CHUNK-token tile and KV head: the latent codes are dequantized
//   into the tile (the codec's own walk: unpack, outliers, scale/zero, low
//   rank), multiplied by that head's rows of U_k^T ([r, d] -> the tile's
//   [n, d] K before RoPE), rotated with cos/sin rows of the tile's tokens
//   (per batch row: left padding keeps each row's positions), then scored
//   by the G query heads of that KV head, as cpu_attention_kernel.h scores.
//   RoPE forms: rotate-half or interleaved over the first `rotary_dim`
//   channels (partial rotary: the rest pass through); the tables are the
//   model's own (any scaling that only changes cos/sin is in them).
// * V stays folded: the softmax weights accumulate the latents themselves
//   (acc_lat [R, r_v]); U_v^T is applied once per output row at the end.
// * The first s tokens (LoRC's exact sinks: K before RoPE, V as projected)
//   shadow the latents' first s tokens: K is rotated like the rest, V
//   accumulates in head space (acc_d [R, d]).
// * The call's new tokens: K exact and already rotated, V as latents.
// Work items: one per (batch row, split of its tokens); the row's KV heads walk
// its shared latents together, so a latent tile is dequantized once, not once
// a head. Partials merge by log-sum-exp as in cpu_attention.cpp.
//
// Included once, at the end of cpu_attention.cpp (after the dispatch); it
// includes itself once per instruction set (GEAR_LORC_WALK) inside that
// set's namespace and target, where that set's micro-kernels and the tile
// helpers of cpu_attention_kernel.h already are.

#ifndef GEAR_LORC_WALK

namespace gear_cpu {

struct LorcProblem {
  int B = 0, Hq = 0, Hkv = 0, G = 0, T = 0, D = 0, DP = 0, R = 0;
  int rk = 0, rkP = 0, rv = 0, rvP = 0;   // latent widths, padded to LANES
  int s = 0;                              // exact sinks
  bool causal = false;
  const float* q = nullptr;               // [B, Hq, T, D] fp32, pre-scaled
  const void* mask = nullptr;
  at::ScalarType mask_type = at::kBool;
  int64_t ms[4] = {0, 0, 0, 0};
  int64_t mask_len = 0;
  const float* uk = nullptr;              // [Hkv, rk, DP]: each KV head's rows of U_k^T, zero past D
  const float* uv = nullptr;              // [Hkv, rv, DP]
  int rope = 0, rd = 0;                   // 0 none, 1 rotate-half, 2 interleaved; rotary dims
  const float *cos = nullptr, *sin = nullptr;   // [Bc, L, rd]
  int64_t cs_b = 0;                       // their batch stride (0: one table for every row)
};

struct LorcPlan {
  SegBase ks[NSTORE], vs[NSTORE];         // the latent stores' segments
  SegBase ksink, vsink, knew, vnew;       // [B, H, s, D] x2, [B, H, T, D], [B, 1, T, rv]
  int64_t lens[NSTORE] = {}, pos0[NSTORE] = {}, first[NSTORE] = {};
  int64_t past = 0, total = 0, heads = 0, splits = 1, per_split = 0;
  int maxrank = 1, krow = 0, vrow = 0;     // low-rank terms, longest code rows of K / V latents
};

}  // namespace gear_cpu

// The rebuild's register block per set: GEAR_LORC_VW floats a vector, GEAR_LORC_NV
// vectors of a K row per token (AVX-512: 4 tokens x 64 channels in 16 of its 32
// registers; AVX2: 4 x 16 in 8 of 16).
namespace gear_cpu::scalar {
#define GEAR_LORC_WALK
#define GEAR_LORC_VW 4
#define GEAR_LORC_NV 2
#include "cpu_lorc_attention.h"
#undef GEAR_LORC_VW
#undef GEAR_LORC_NV
#undef GEAR_LORC_WALK
}  // namespace gear_cpu::scalar

#ifdef GEAR_X86_DISPATCH
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace gear_cpu::avx2 {
#define GEAR_LORC_WALK
#define GEAR_LORC_VW 8
#define GEAR_LORC_NV 2
#include "cpu_lorc_attention.h"
#undef GEAR_LORC_VW
#undef GEAR_LORC_NV
#undef GEAR_LORC_WALK
}  // namespace gear_cpu::avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace gear_cpu::avx512 {
#define GEAR_LORC_WALK
#define GEAR_LORC_VW 16
#define GEAR_LORC_NV 4
#include "cpu_lorc_attention.h"
#undef GEAR_LORC_VW
#undef GEAR_LORC_NV
#undef GEAR_LORC_WALK
}  // namespace gear_cpu::avx512
#pragma GCC pop_options
#endif

namespace gear_cpu {

void lorc_run(const LorcProblem& P, const LorcPlan& L, float* part) {
  switch (static_cast<Isa>(active_isa().load())) {
#ifdef GEAR_X86_DISPATCH
    case Isa::avx512vnni:
    case Isa::avx512: return avx512::lorc_run_items(P, L, part);
    case Isa::avx2: return avx2::lorc_run_items(P, L, part);
#endif
    default: return scalar::lorc_run_items(P, L, part);
  }
}

// [H, r, D] (any float dtype) -> [H, r, DP] fp32, zero past D.
std::vector<float> padded_up(const at::Tensor& up, int H, int D, int DP, int* rank) {
  TORCH_CHECK(up.dim() == 3 && up.size(0) == H && up.size(2) == D,
              "gear lorc_attention_cpu: U^T must be [KV heads, rank, head dim] = [", H, ", r, ", D, "], got ",
              up.sizes());
  at::Tensor u = up.to(at::kFloat).contiguous();
  *rank = static_cast<int>(u.size(1));
  std::vector<float> out(static_cast<size_t>(H) * *rank * DP, 0.0f);
  const float* src = u.data_ptr<float>();
  for (int64_t row = 0; row < static_cast<int64_t>(H) * *rank; ++row)
    std::memcpy(out.data() + row * DP, src + row * D, D * sizeof(float));
  return out;
}

at::Tensor lorc_attention_cpu(const at::Tensor& q_in, at::TensorList k_parts, at::TensorList v_parts,
                              const at::Tensor& k_sinks, const at::Tensor& v_sinks,
                              const c10::optional<at::Tensor>& k_new, const c10::optional<at::Tensor>& v_new,
                              const at::Tensor& uk, const at::Tensor& uv,
                              const c10::optional<at::Tensor>& cos_in, const c10::optional<at::Tensor>& sin_in,
                              const c10::optional<at::Tensor>& attn_mask, double scale, bool is_causal,
                              at::IntArrayRef k_desc, at::IntArrayRef v_desc, int64_t rope, int64_t rotary_dim) {
  TORCH_CHECK(q_in.dim() == 4, "gear lorc_attention_cpu: q must be [B, Hq, T, D]");
  TORCH_CHECK(k_desc.size() == 2 + NSTORE * NFIELDS && v_desc.size() == k_desc.size(),
              "gear lorc_attention_cpu: descriptor size mismatch");
  TORCH_CHECK(k_new.has_value() == v_new.has_value(), "gear lorc_attention_cpu: k_new without v_new");
  TORCH_CHECK(rope >= 0 && rope <= 2, "gear lorc_attention_cpu: rope must be 0 (none), 1 (rotate-half) "
              "or 2 (interleaved), got ", rope);
  std::vector<at::Tensor> kp(k_parts.begin(), k_parts.end()), vp(v_parts.begin(), v_parts.end());
  for (auto& t : kp) t = t.contiguous();
  for (auto& t : vp) t = t.contiguous();
  LorcProblem P;
  P.B = q_in.size(0); P.Hq = q_in.size(1); P.T = q_in.size(2); P.D = q_in.size(3);
  P.DP = (P.D + LANES - 1) / LANES * LANES;
  at::Tensor ks = k_sinks.contiguous(), vs = v_sinks.contiguous();
  TORCH_CHECK(ks.dim() == 4 && ks.size(0) == P.B && ks.size(3) == P.D && vs.sizes() == ks.sizes(),
              "gear lorc_attention_cpu: the sinks must be [B, KV heads, s, D], got ", ks.sizes(), " and ",
              vs.sizes());
  P.Hkv = ks.size(1);
  TORCH_CHECK(P.Hq % P.Hkv == 0, "gear lorc_attention_cpu: query heads ", P.Hq, " are not a multiple of KV heads ",
              P.Hkv);
  P.G = P.Hq / P.Hkv;
  P.R = P.G * P.T;
  P.s = static_cast<int>(ks.size(2));
  P.causal = is_causal && P.T > 1;
  std::vector<float> ukp = padded_up(uk, P.Hkv, P.D, P.DP, &P.rk);
  std::vector<float> uvp = padded_up(uv, P.Hkv, P.D, P.DP, &P.rv);
  P.uk = ukp.data();
  P.uv = uvp.data();
  P.rkP = (P.rk + LANES - 1) / LANES * LANES;
  P.rvP = (P.rv + LANES - 1) / LANES * LANES;
  at::Tensor q = q_in.to(at::kFloat).mul(scale).contiguous();
  P.q = q.data_ptr<float>();

  LorcPlan L;
  const at::Tensor& lengths = kp[k_desc[0]];
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.numel() == NLENGTHS,
              "gear lorc_attention_cpu: lengths must be int64 [3]");
  const int64_t* lp = lengths.data_ptr<int64_t>();
  const int64_t sink_len = kp[k_desc[2 + CODES]].size(2);
  const int64_t lens[NSTORE] = {sink_len, lp[0], lp[1], lp[2]};
  for (int i = 0; i < NSTORE; ++i) {
    L.ks[i] = make_seg(kp, k_desc.data() + 2 + i * NFIELDS);
    L.vs[i] = make_seg(vp, v_desc.data() + 2 + i * NFIELDS);
    TORCH_CHECK(L.ks[i].seg.W * (L.ks[i].seg.exact ? 1 : 8 / L.ks[i].seg.bits) >= P.rk &&
                L.vs[i].seg.W * (L.vs[i].seg.exact ? 1 : 8 / L.vs[i].seg.bits) >= P.rv,
                "gear lorc_attention_cpu: a latent store is narrower than U^T's rank");
    TORCH_CHECK(lens[i] <= L.ks[i].seg.cap, "gear lorc_attention_cpu: segment ", i, " holds ", lens[i],
                " tokens, capacity ", L.ks[i].seg.cap);
    for (const Seg& g : {L.ks[i].seg, L.vs[i].seg}) L.maxrank = std::max(L.maxrank, g.rank);
    L.krow = std::max(L.krow, L.ks[i].seg.exact ? L.ks[i].seg.W : (8 / L.ks[i].seg.bits) * L.ks[i].seg.W);
    L.vrow = std::max(L.vrow, L.vs[i].seg.exact ? L.vs[i].seg.W : (8 / L.vs[i].seg.bits) * L.vs[i].seg.W);
  }
  const int64_t pos0[NSTORE] = {0, 0, lens[1], lens[1] + lens[2]};
  const int64_t first[NSTORE] = {0, sink_len, 0, 0};
  std::copy(lens, lens + NSTORE, L.lens);
  std::copy(pos0, pos0 + NSTORE, L.pos0);
  std::copy(first, first + NSTORE, L.first);
  L.past = lens[1] + lens[2] + lens[3];
  TORCH_CHECK(P.s <= L.past, "gear lorc_attention_cpu: ", P.s, " sinks for a past of ", L.past);
  L.ksink = exact_seg(ks);
  L.vsink = exact_seg(vs);
  at::Tensor kn, vn;
  if (k_new.has_value()) {
    kn = k_new->contiguous();
    vn = v_new->contiguous();
    TORCH_CHECK(kn.dim() == 4 && kn.size(0) == P.B && kn.size(1) == P.Hkv && kn.size(3) == P.D,
                "gear lorc_attention_cpu: k_new must be [B, KV heads, T, D], got ", kn.sizes());
    TORCH_CHECK(vn.dim() == 4 && vn.size(0) == P.B && vn.size(1) == 1 && vn.size(2) == kn.size(2) &&
                vn.size(3) == P.rv, "gear lorc_attention_cpu: v_new must be V's latents [B, 1, T, ", P.rv,
                "], got ", vn.sizes());
    L.knew = exact_seg(kn);
    L.vnew = exact_seg(vn);
  }
  const int64_t n_new = kn.defined() ? kn.size(2) : 0;
  L.total = L.past + n_new;

  at::Tensor cos, sin;
  P.rope = static_cast<int>(rope);
  if (rope) {
    TORCH_CHECK(cos_in.has_value() && sin_in.has_value(), "gear lorc_attention_cpu: RoPE needs cos and sin");
    P.rd = static_cast<int>(rotary_dim);
    TORCH_CHECK(P.rd > 0 && P.rd <= P.D && P.rd % 2 == 0, "gear lorc_attention_cpu: rotary_dim ", P.rd,
                " must be even and in (0, ", P.D, "]");
    cos = cos_in->to(at::kFloat).contiguous();
    sin = sin_in->to(at::kFloat).contiguous();
    TORCH_CHECK(cos.sizes() == sin.sizes() && cos.dim() >= 2 && cos.size(-1) == P.rd && cos.size(-2) == L.past,
                "gear lorc_attention_cpu: cos/sin must be [B or 1, ", L.past, " past tokens, ", P.rd, "], got ",
                cos.sizes());
    const int64_t rows = cos.numel() / (L.past * P.rd);
    TORCH_CHECK(rows == 1 || rows == P.B, "gear lorc_attention_cpu: cos/sin for ", rows, " rows, batch ", P.B);
    P.cos = cos.data_ptr<float>();
    P.sin = sin.data_ptr<float>();
    P.cs_b = rows == 1 ? 0 : L.past * P.rd;
  }
  at::Tensor mask = bind_mask(P, attn_mask, "gear lorc_attention_cpu");

  // split each batch row's tokens (its KV heads walk them together) as
  // cpu_attention.cpp splits a (batch, KV head)'s
  const int64_t heads = static_cast<int64_t>(P.B) * P.Hkv;
  const int64_t threads = at::get_num_threads();
  const int64_t most = std::max<int64_t>(1, L.total / MIN_SPLIT);
  int64_t splits = std::max<int64_t>(1, (4 * threads + P.B - 1) / P.B);
  while (splits < most && (P.B * splits) % threads) ++splits;
  splits = std::min(splits, most);
  L.heads = heads;
  L.splits = splits;
  L.per_split = (L.total + splits - 1) / splits;
  const int R = P.R, D = P.D, DP = P.DP, rvP = P.rvP;
  const int64_t stride = 2 + DP + rvP;    // per item and row: m, l, acc_d[DP], acc_lat[rvP]
  std::vector<float> part(heads * splits * R * stride);
  lorc_run(P, L, part.data());

  at::Tensor out = at::empty_like(q_in, q_in.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  const int64_t os[4] = {out.stride(0), out.stride(1), out.stride(2), out.stride(3)};
  std::vector<float> md(DP), ml(rvP);
  for (int64_t head = 0; head < heads; ++head) {
    const int b = static_cast<int>(head / P.Hkv), kvh = static_cast<int>(head % P.Hkv);
    const float* up = P.uv + static_cast<int64_t>(kvh) * P.rv * DP;
    for (int r = 0; r < R; ++r) {
      const int g = r / P.T, i = r % P.T;
      float m = -INFINITY;
      for (int64_t sp = 0; sp < splits; ++sp) m = std::max(m, part[((head * splits + sp) * R + r) * stride]);
      const float m_use = m == -INFINITY ? 0.0f : m;
      float l = 0.0f;
      std::fill(md.begin(), md.end(), 0.0f);
      std::fill(ml.begin(), ml.end(), 0.0f);
      for (int64_t sp = 0; sp < splits; ++sp) {
        const float* src = part.data() + ((head * splits + sp) * R + r) * stride;
        const float w = src[0] == -INFINITY ? 0.0f : std::exp(src[0] - m_use);
        l += w * src[1];
        for (int d = 0; d < DP; ++d) md[d] += w * src[2 + d];
        for (int k = 0; k < rvP; ++k) ml[k] += w * src[2 + DP + k];
      }
      for (int k = 0; k < P.rv; ++k)          // U_v^T once per output row
        for (int d = 0; d < D; ++d) md[d] += ml[k] * up[k * DP + d];
      const float inv = 1.0f / l;
      float* dst = o + b * os[0] + (kvh * P.G + g) * os[1] + i * os[2];
      for (int d = 0; d < D; ++d) dst[d * os[3]] = md[d] * inv;
    }
  }
  return out.to(q_in.scalar_type());
}

}  // namespace gear_cpu

TORCH_LIBRARY_FRAGMENT(gear, m) {
  m.def("lorc_attention_cpu(Tensor q, Tensor[] k_parts, Tensor[] v_parts, Tensor k_sinks, Tensor v_sinks, "
        "Tensor? k_new, Tensor? v_new, Tensor uk, Tensor uv, Tensor? cos, Tensor? sin, Tensor? attn_mask, "
        "float scale, bool is_causal, int[] k_desc, int[] v_desc, int rope, int rotary_dim) -> Tensor");
}

TORCH_LIBRARY_IMPL(gear, CPU, m) { m.impl("lorc_attention_cpu", &gear_cpu::lorc_attention_cpu); }

#else  // GEAR_LORC_WALK: one instruction set's walk (its micro-kernels and tile helpers are in scope)

// Per-thread buffers of the LoRC walk: the latent tiles (Scratch of the codec's
// walk, sized for a latent row), the K tile [CHUNK, DP], the exact V tile.
struct LorcScratch {
  Problem pk, pv;                  // shapes the codec helpers read: D = latent width
  Scratch sk, sv;
  std::vector<float> score, ktile, vtile;
  static Problem latent(int width) {
    Problem p{};
    p.D = width;
    p.DP = (width + LANES - 1) / LANES * LANES;
    p.R = 1;
    return p;
  }
  LorcScratch(const LorcProblem& P, const LorcPlan& L)
      : pk(latent(P.rk)), pv(latent(P.rv)), sk(pk, L.maxrank, L.krow), sv(pv, L.maxrank, L.vrow),
        score(P.R * CHUNK), ktile(CHUNK * P.DP, 0.0f), vtile(CHUNK * P.DP, 0.0f) {}
};

// Tokens [t0, t0+n) of a latent segment, dequantized into sc.tile (rows
// sc.ts apart): the codes, their outliers, scale and zero, the low rank.
inline void lorc_latent_tile(const Seg& s, bool key, int64_t t0, int n, int width, Scratch& sc) {
  load_tile(s, t0, n, width, sc);
  if (s.exact) return;
  if (s.k2) {
    if (key) k_outliers(s, t0, n, [&](int j, uint32_t c, float v) { sc.tile_row(j)[c] += v; });
    else v_outliers(s, t0, n, sc);
  }
  rebuild_tile(s, t0, n, width, sc);
  if (!s.rank) return;
  const int rk = s.rank, wp = (width + LANES - 1) / LANES * LANES;
  load_a(s, t0, n, sc);
  for (int j0 = 0; j0 < n;) {
    const int64_t blk = (t0 + j0) / s.block;
    const int j1 = static_cast<int>(std::min<int64_t>(n, (blk + 1) * s.block - t0));
    load_b(s, blk, width, wp, sc);
    for (int j = j0; j < j1; ++j)
      for (int k = 0; k < rk; ++k) axpy(sc.at[k * CHUNK + j], sc.brow.data() + k * wp, sc.tile_row(j), width);
    j0 = j1;
  }
}

// The rebuild K = C U^T of a tile: kt[j][:DP] = sum_k lat[j][k] u[k][:DP]
// (lat rows ls apart, u and kt rows DP apart; DP a multiple of 16). NR tokens x
// NV vectors of accumulators stay in registers over the whole rank: per latent
// entry one broadcast, per U row NV loads, NR * NV multiply-adds (GCC's vector
// extension, GEAR_LORC_VW floats: one register of the set).
typedef float lorc_vec __attribute__((vector_size(4 * GEAR_LORC_VW)));
constexpr int LORC_VW = GEAR_LORC_VW, LORC_NV = GEAR_LORC_NV;

template <int NR, int NV>
inline void lorc_rebuild_block(const float* lat, int ls, int rk, const float* u, int DP, float* kt) {
  lorc_vec acc[NR][NV];
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = lorc_vec{};
  for (int k = 0; k < rk; ++k) {
    lorc_vec uk[NV];
    for (int v = 0; v < NV; ++v) std::memcpy(&uk[v], u + k * DP + LORC_VW * v, sizeof(lorc_vec));
    for (int r = 0; r < NR; ++r) {
      const float x = lat[r * ls + k];
      for (int v = 0; v < NV; ++v) acc[r][v] += x * uk[v];
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int v = 0; v < NV; ++v) std::memcpy(kt + r * DP + LORC_VW * v, &acc[r][v], sizeof(lorc_vec));
}

template <int NV>
inline void lorc_rebuild_rows(const float* lat, int ls, int rows, int rk, const float* u, int DP, float* kt) {
  switch (rows) {
    case 4: return lorc_rebuild_block<4, NV>(lat, ls, rk, u, DP, kt);
    case 3: return lorc_rebuild_block<3, NV>(lat, ls, rk, u, DP, kt);
    case 2: return lorc_rebuild_block<2, NV>(lat, ls, rk, u, DP, kt);
    default: return lorc_rebuild_block<1, NV>(lat, ls, rk, u, DP, kt);
  }
}

inline void lorc_rebuild(const float* lat, int ls, int n, int rk, const float* u, int DP, float* kt) {
  for (int j = 0; j < n; j += 4) {
    const int rows = std::min(4, n - j);
    for (int d = 0; d < DP;) {
      const float* lj = lat + j * ls;
      float* kj = kt + j * DP + d;
      if ((DP - d) >= LORC_NV * LORC_VW) {
        lorc_rebuild_rows<LORC_NV>(lj, ls, rows, rk, u + d, DP, kj);
        d += LORC_NV * LORC_VW;
      } else {
        lorc_rebuild_rows<1>(lj, ls, rows, rk, u + d, DP, kj);
        d += LORC_VW;
      }
    }
  }
}

// RoPE on the n K rows of the tile (DP apart), cos/sin rows DP.. apart:
// k * cos + rot(k) * sin over the first rd channels.
inline void lorc_rope(const LorcProblem& P, float* k, int n, const float* cos, const float* sin) {
  const int rd = P.rd, DP = P.DP;
  for (int j = 0; j < n; ++j, k += DP, cos += rd, sin += rd) {
    if (P.rope == 1) {
      const int h = rd / 2;
      for (int i = 0; i < h; ++i) {
        const float x1 = k[i], x2 = k[i + h];
        k[i] = x1 * cos[i] - x2 * sin[i];
        k[i + h] = x2 * cos[i + h] + x1 * sin[i + h];
      }
    } else {
      for (int i = 0; i < rd; i += 2) {
        const float x1 = k[i], x2 = k[i + 1];
        k[i] = x1 * cos[i] - x2 * sin[i];
        k[i + 1] = x2 * cos[i + 1] + x1 * sin[i + 1];
      }
    }
  }
}

// Scores, mask and online softmax of the R rows over tokens [t, t+n) (global
// indices), the scores in sc.score; returns with them as the weights p.
inline void lorc_softmax(const LorcProblem& P, const LorcPlan& L, int64_t t, int n, int b, int kvh,
                         LorcScratch& sc, State& st, float* lat) {
  const int R = P.R, DP = P.DP, rvP = P.rvP;
  for (int r = 0; r < R; ++r) {
    const int g = r / P.T, i = r % P.T;
    float* s = sc.score.data() + r * CHUNK;
    if (P.causal) {
      const int64_t limit = L.total - P.T + i + 1;
      for (int j = 0; j < n; ++j) if (t + j >= limit) s[j] = -INFINITY;
    }
    if (P.mask) {
      const int64_t shift = P.mask_len - L.total;
      for (int j = 0; j < n; ++j) {
        const int64_t col = t + j + shift;
        if (col < 0) { s[j] = -INFINITY; continue; }
        const int64_t off = b * P.ms[0] + (kvh * P.G + g) * P.ms[1] + i * P.ms[2] + col * P.ms[3];
        switch (P.mask_type) {
          case at::kBool: s[j] = static_cast<const bool*>(P.mask)[off] ? s[j] : -INFINITY; break;
          case at::kFloat: s[j] += static_cast<const float*>(P.mask)[off]; break;
          case at::kHalf: s[j] += static_cast<float>(static_cast<const at::Half*>(P.mask)[off]); break;
          default: s[j] += static_cast<float>(static_cast<const at::BFloat16*>(P.mask)[off]); break;
        }
      }
    }
    const float m_new = std::max(st.m[r], max_of(s, n));
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;
    const float alpha = st.m[r] == -INFINITY ? 0.0f : exp_neg(st.m[r] - m_use);
    st.l[r] = st.l[r] * alpha + exp_shifted(s, n, m_use);
    st.m[r] = m_new;
    if (alpha != 1.0f) {
      float* acc = st.acc.data() + r * DP;
      for (int d = 0; d < DP; ++d) acc[d] *= alpha;
      float* al = lat + r * rvP;
      for (int k = 0; k < rvP; ++k) al[k] *= alpha;
    }
  }
}

// K rows of tokens [t, t+n) from exact rows (pre-RoPE sinks or the rotated
// new tokens) into sc.ktile.
inline void lorc_exact_k(const Seg& s, int64_t t0, int n, int D, LorcScratch& sc, int DP) {
  for (int j = 0; j < n; ++j) exact_row(s, t0 + j, D, sc.ktile.data() + j * DP);
}

// One work item per (batch row, split): the latents are shared by the layer's
// KV heads, so each latent tile is dequantized once and then rebuilt, scored
// and accumulated by every KV head in turn (each with its own U_k^T rows,
// query rows and softmax state). Partials land per (row, KV head, split).
void lorc_run_items(const LorcProblem& P, const LorcPlan& L, float* part) {
  const int R = P.R, D = P.D, DP = P.DP, rvP = P.rvP, H = P.Hkv;
  const int64_t stride = 2 + DP + rvP;
  at::parallel_for(0, P.B * L.splits, 1, [&](int64_t begin, int64_t end) {
    LorcScratch sc(P, L);
    std::vector<float> qh(static_cast<size_t>(H) * R * DP, 0.0f);
    std::vector<float> lat(static_cast<size_t>(H) * R * rvP);
    for (int64_t item = begin; item < end; ++item) {
      const int b = static_cast<int>(item / L.splits);
      const int64_t split = item % L.splits;
      for (int kvh = 0; kvh < H; ++kvh)
        for (int g = 0; g < P.G; ++g)
          for (int i = 0; i < P.T; ++i)
            std::memcpy(qh.data() + (kvh * R + g * P.T + i) * DP,
                        P.q + ((static_cast<int64_t>(b) * P.Hq + kvh * P.G + g) * P.T + i) * D, D * sizeof(float));
      std::vector<State> st(H, State(R, DP));
      std::fill(lat.begin(), lat.end(), 0.0f);
      const float* cos = P.cos ? P.cos + b * P.cs_b : nullptr;
      const float* sin = P.sin ? P.sin + b * P.cs_b : nullptr;
      const int64_t lo = split * L.per_split, hi = std::min(L.total, lo + L.per_split);
      // one KV head over the tile in sc.ktile (K rotated, tokens g0..g0+n):
      // score, softmax, then the weighted V rows (vt, vs apart) into acc, acc_w
      // wide: head space for the sinks, the head's latent accumulator otherwise
      auto attend = [&](int kvh, int64_t g0, int n, const float* vt, int vs, float* acc, int acc_w) {
        float* q = qh.data() + kvh * R * DP;
        float* lh = lat.data() + kvh * R * rvP;
        score_tile(q, R, DP, sc.ktile.data(), DP, n, sc.score.data(), CHUNK);
        lorc_softmax(P, L, g0, n, b, kvh, sc, st[kvh], lh);
        accumulate_tile(sc.score.data(), CHUNK, R, n, vt, vs, acc, acc_w, 0, acc_w);
      };
      // the exact sinks: K before RoPE, V in head space
      for (int kvh = 0; kvh < H; ++kvh) {
        const Seg K = L.ksink.at(b * H + kvh), V = L.vsink.at(b * H + kvh);
        for (int64_t t = lo; t < std::min<int64_t>(hi, P.s); t += CHUNK) {
          const int n = static_cast<int>(std::min<int64_t>(CHUNK, std::min<int64_t>(hi, P.s) - t));
          lorc_exact_k(K, t, n, D, sc, DP);
          if (P.rope) lorc_rope(P, sc.ktile.data(), n, cos + t * P.rd, sin + t * P.rd);
          for (int j = 0; j < n; ++j) exact_row(V, t + j, D, sc.vtile.data() + j * DP);
          attend(kvh, t, n, sc.vtile.data(), DP, st[kvh].acc.data(), DP);
        }
      }
      // the latent stores' segments, from token s on: each tile's latents
      // dequantized once; per head K rebuilt and rotated, V folded
      for (int sg = 0; sg < NSTORE; ++sg) {
        const int64_t a = std::max({lo, L.pos0[sg] + L.first[sg], static_cast<int64_t>(P.s)}) - L.pos0[sg];
        const int64_t z = std::min(hi, L.pos0[sg] + L.lens[sg]) - L.pos0[sg];
        if (a >= z) continue;
        const Seg K = L.ks[sg].at(b), V = L.vs[sg].at(b);
        for (int64_t t = a; t < z; t += CHUNK) {
          const int n = static_cast<int>(std::min<int64_t>(CHUNK, z - t));
          const int64_t g0 = L.pos0[sg] + t;                 // global index of the tile's first token
          const float* kl;
          int ks;
          if (K.exact && K.dtype == at::kFloat) {   // fp32 latents: read in place
            kl = static_cast<const float*>(K.data) + t * K.W;
            ks = K.W;
          } else {
            lorc_latent_tile(K, true, t, n, P.rk, sc.sk);
            kl = sc.sk.tile.data();
            ks = sc.sk.ts;
          }
          lorc_latent_tile(V, false, t, n, P.rv, sc.sv);
          for (int kvh = 0; kvh < H; ++kvh) {
            lorc_rebuild(kl, ks, n, P.rk, P.uk + static_cast<int64_t>(kvh) * P.rk * DP, DP, sc.ktile.data());
            if (P.rope) lorc_rope(P, sc.ktile.data(), n, cos + g0 * P.rd, sin + g0 * P.rd);
            attend(kvh, g0, n, sc.sv.tile.data(), sc.sv.ts, lat.data() + kvh * R * rvP, rvP);
          }
        }
      }
      // the call's new tokens: K exact and rotated, V as latents
      if (L.total > L.past) {
        const Seg V = L.vnew.at(b);
        const int64_t a = std::max(lo, L.past), z = hi;
        for (int64_t t = a; t < z; t += CHUNK) {
          const int n = static_cast<int>(std::min<int64_t>(CHUNK, z - t));
          for (int j = 0; j < n; ++j) exact_row(V, t - L.past + j, P.rv, sc.sv.tile_row(j));
          for (int kvh = 0; kvh < H; ++kvh) {
            lorc_exact_k(L.knew.at(b * H + kvh), t - L.past, n, D, sc, DP);
            attend(kvh, t, n, sc.sv.tile.data(), sc.sv.ts, lat.data() + kvh * R * rvP, rvP);
          }
        }
      }
      for (int kvh = 0; kvh < H; ++kvh) {
        float* out = part + ((static_cast<int64_t>(b) * H + kvh) * L.splits + split) * R * stride;
        for (int r = 0; r < R; ++r) {
          out[r * stride] = st[kvh].m[r];
          out[r * stride + 1] = st[kvh].l[r];
          std::memcpy(out + r * stride + 2, st[kvh].acc.data() + r * DP, DP * sizeof(float));
          std::memcpy(out + r * stride + 2 + DP, lat.data() + (kvh * R + r) * rvP, rvP * sizeof(float));
        }
      }
    }
  });
}

#endif  // GEAR_LORC_WALK
