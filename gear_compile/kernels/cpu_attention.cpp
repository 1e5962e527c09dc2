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
//
// Files: this one holds the op, the store descriptor's parsing, the split
// plan and the final merge; cpu_attention_kernel.h the walk of one work item,
// compiled once per instruction set with that set's micro-kernels
// (cpu_simd_*.h); the set is picked at run time (`active_isa`), so the
// library runs on any x86-64 CPU whatever machine built it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "cpu_simd.h"

namespace gear_cpu {

constexpr int CHUNK = 64;          // tokens scored per softmax update
constexpr int MIN_SPLIT = 256;     // fewest tokens worth a work item of their own
constexpr int TILE = 16;           // tokens a K-outlier pointer covers (outliers.py: TILE)
constexpr int TOKEN_BITS = 8;      // a K record's token field: its offset mod 256 (outliers.py)
constexpr int MAX_QUADS = 64;      // integer dots: code dword fields a row (4 channels each), D <= 256

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
  const float* sink_logits = nullptr;   // [Hq] or null: one more logit per query head, value 0
  // folded K scores by integer dots (cpu_simd_avx512.h: vnni_limbs, vnni_scores), or null
  void (*int_limbs)(const float* q, int D, int nch, uint8_t* h, uint8_t* m, uint8_t* l,
                    float* scale) = nullptr;
  void (*int_scores)(const uint8_t* codes, int W, int bits, int n, const int32_t* limbs,
                     const float* scale, int R, float* out, int os) = nullptr;
  void (*int_lowrank)(const int8_t* a, int rk, int n, const int32_t* limbs, const int32_t* bias,
                      const float* scale, int R, float* out, int os) = nullptr;
};

// Per-thread buffers; rows of DP floats (zero padding keeps dot products exact).
// What is computed once per token group or block (q*s and q.z, q.B diag(s))
// is kept with the address it was computed from; the rank-space sum p.A of
// V's current block waits in `pa` for its one pass through B^T.
struct Scratch {
  int ts;                         // tile row stride: room for DP floats or PB*W codes
  std::vector<float> q, qs, qz, qb, pa, w, score, row, row2, tile, at, sa, za, sg, zg, brow, lscale;
  std::vector<int32_t> limbs;     // q*s as integer limbs (quantize_limbs), with their row scales
  std::vector<int32_t> lr_limbs, lr_bias;   // q.B diag(s) as limbs (quantize_rank_limbs)
  std::vector<float> lr_scale;
  const void* qs_key = nullptr;   // the scale row q*s and q.z were computed for
  const void* qb_key = nullptr;   // the B block qb = q.B diag(s) was computed for
  int64_t pa_blk = -1;            // V's block whose p.A `pa` holds (-1: none)
  Scratch(const Problem& P, int maxrank, int maxrow)
      : ts((std::max(P.DP, maxrow) + LANES - 1) / LANES * LANES),
        q(P.R * P.DP, 0.0f), qs(P.R * P.DP, 0.0f), qz(P.R), qb(P.R * std::max(maxrank, 1)),
        pa(P.R * std::max(maxrank, 1), 0.0f), w(P.R * CHUNK), score(P.R * CHUNK),
        row(ts, 0.0f), row2(ts, 0.0f), tile(CHUNK * ts, 0.0f), at(std::max(maxrank, 1) * CHUNK),
        sa(CHUNK * P.D), za(CHUNK * P.D), sg(CHUNK), zg(CHUNK), brow(std::max(maxrank, 1) * P.DP, 0.0f), lscale(P.R),
        limbs(P.int_scores ? P.R * 3 * MAX_QUADS : 0), lr_limbs(P.R * 3), lr_bias(P.R * 3),
        lr_scale(P.R) {}
  // A new segment of the walk: nothing computed for another may be reused.
  void start_segment() {
    qs_key = qb_key = nullptr;
    pa_blk = -1;
    std::fill(pa.begin(), pa.end(), 0.0f);
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

// How the tokens are cut into work items, and where each segment sits.
struct Plan {
  SegBase ks[NSEG], vs[NSEG];
  int64_t lens[NSEG], pos0[NSEG], first[NSEG];
  int64_t total = 0, heads = 0, splits = 1, per_split = 0;
  int maxrank = 1, maxrow = 0;
};

}  // namespace gear_cpu

// ---------------------------------------------------------------- one walk per ISA
// The same walk (cpu_attention_kernel.h) over each set of micro-kernels, each
// compiled for its own target: only code in these namespaces may use the
// set's instructions, and it runs only where the CPU has them (`active_isa`).
namespace gear_cpu::scalar {
#include "cpu_simd_scalar.h"
#include "cpu_attention_kernel.h"
#include "cpu_paged_attention.h"
}  // namespace gear_cpu::scalar

#ifdef GEAR_X86_DISPATCH
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace gear_cpu::avx2 {
#include "cpu_simd_avx2.h"
#include "cpu_attention_kernel.h"
#include "cpu_paged_attention.h"
}  // namespace gear_cpu::avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace gear_cpu::avx512 {
#include "cpu_simd_avx512.h"
#include "cpu_attention_kernel.h"
#include "cpu_paged_attention.h"
}  // namespace gear_cpu::avx512
#pragma GCC pop_options
#endif

namespace gear_cpu {

// ---------------------------------------------------------------- dispatch
// avx512vnni: the AVX-512 walk with the folded K scores by VNNI integer dots
enum class Isa { scalar, avx2, avx512, avx512vnni };
constexpr const char* kIsaNames[] = {"scalar", "avx2", "avx512", "avx512vnni"};

bool supported(Isa isa) {
#ifdef GEAR_X86_DISPATCH
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                    __builtin_cpu_supports("f16c");
  switch (isa) {
    case Isa::scalar: return true;
    case Isa::avx2: return avx2;
    case Isa::avx512: return avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
    case Isa::avx512vnni: return supported(Isa::avx512) && __builtin_cpu_supports("avx512vnni");
  }
  return false;
#else
  return isa == Isa::scalar;
#endif
}

Isa parse_isa(const std::string& name) {
  for (int i = 3; i >= 0; --i) {
    Isa isa = static_cast<Isa>(i);
    if (name == kIsaNames[i]) {
      TORCH_CHECK(supported(isa), "gear attention_cpu: instruction set '", name,
                  "' is not available on this CPU (or this build); choose one of those below it in "
                  "avx512vnni > avx512 > avx2 > scalar, or 'auto'.");
      return isa;
    }
  }
  TORCH_CHECK(name == "auto", "gear attention_cpu: instruction set must be one of auto, avx512vnni, "
              "avx512, avx2, scalar, got '", name, "'.");
  for (Isa isa : {Isa::avx512vnni, Isa::avx512, Isa::avx2}) if (supported(isa)) return isa;
  return Isa::scalar;
}

// The set every call uses: the best this CPU has, unless $GEAR_CPU_ISA (read
// at the first call) or the `gear::cpu_isa` op names another.
std::atomic<int>& active_isa() {
  static std::atomic<int> isa{static_cast<int>(parse_isa([] {
    const char* env = std::getenv("GEAR_CPU_ISA");
    return std::string(env && *env ? env : "auto");
  }()))};
  return isa;
}

// gear::cpu_isa(name): "" reports the set in use; a name (or "auto") picks it.
std::string cpu_isa(c10::string_view name) {
  if (!name.empty()) active_isa() = static_cast<int>(parse_isa(std::string(name)));
  return kIsaNames[active_isa().load()];
}

void run_items(Problem& P, const Plan& L, float* part) {
  switch (static_cast<Isa>(active_isa().load())) {
#ifdef GEAR_X86_DISPATCH
    case Isa::avx512vnni:
      P.int_limbs = avx512::vnni_limbs;
      P.int_scores = avx512::vnni_scores;
      P.int_lowrank = avx512::vnni_lowrank;
      return avx512::run_items(P, L, part);
    case Isa::avx512: return avx512::run_items(P, L, part);
    case Isa::avx2: return avx2::run_items(P, L, part);
#endif
    default: return scalar::run_items(P, L, part);
  }
}

// ---------------------------------------------------------------- the op
// Points P (any op's problem: B, Hq, T; mask, mask_type, ms, mask_len) at the
// attention mask broadcast to [B, Hq, T, len]; returns the tensor the pointer
// reads, which the caller keeps alive while the walk runs (undefined: no mask).
template <class Prob>
at::Tensor bind_mask(Prob& P, const c10::optional<at::Tensor>& attn_mask, const char* op) {
  if (!attn_mask.has_value()) return at::Tensor();
  at::Tensor mask = *attn_mask;
  while (mask.dim() < 4) mask = mask.unsqueeze(0);
  mask = mask.expand({P.B, P.Hq, P.T, mask.size(3)});
  P.mask = mask.data_ptr();
  P.mask_type = mask.scalar_type();
  TORCH_CHECK(P.mask_type == at::kBool || P.mask_type == at::kFloat || P.mask_type == at::kHalf ||
              P.mask_type == at::kBFloat16, op, ": mask must be bool or float");
  for (int i = 0; i < 4; ++i) P.ms[i] = mask.stride(i);
  P.mask_len = mask.size(3);
  return mask;
}

at::Tensor attention_cpu(const at::Tensor& q_in, at::TensorList k_parts, at::TensorList v_parts,
                         const c10::optional<at::Tensor>& k_new, const c10::optional<at::Tensor>& v_new,
                         const c10::optional<at::Tensor>& attn_mask, double scale, bool is_causal,
                         at::IntArrayRef k_desc, at::IntArrayRef v_desc, double softcap,
                         const c10::optional<at::Tensor>& sink_logits_in) {
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
  P.DP = (P.D + LANES - 1) / LANES * LANES;
  P.Hkv = kp[k_desc[1]].size(1);
  TORCH_CHECK(P.Hq % P.Hkv == 0, "gear attention_cpu: query heads ", P.Hq,
              " are not a multiple of KV heads ", P.Hkv);
  P.G = P.Hq / P.Hkv;
  P.R = P.G * P.T;
  P.causal = is_causal && P.T > 1;
  P.softcap = static_cast<float>(softcap);
  at::Tensor sink_logits;
  if (sink_logits_in.has_value()) {
    sink_logits = sink_logits_in->to(at::kFloat).contiguous();
    TORCH_CHECK(sink_logits.numel() == P.Hq, "gear attention_cpu: sink_logits must hold one logit per query "
                "head (", P.Hq, "), got ", sink_logits.numel());
    P.sink_logits = sink_logits.data_ptr<float>();
  }
  at::Tensor q = q_in.to(at::kFloat).mul(scale).contiguous();
  P.q = q.data_ptr<float>();
  at::Tensor mask = bind_mask(P, attn_mask, "gear attention_cpu");

  Plan L;
  SegBase* ks = L.ks;
  SegBase* vs = L.vs;
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
  std::copy(lens, lens + NSEG, L.lens);
  std::copy(pos0, pos0 + NSEG, L.pos0);
  std::copy(first, first + NSEG, L.first);

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

  L.total = total;
  L.heads = heads;
  L.splits = splits;
  L.per_split = per_split;
  L.maxrank = maxrank;
  L.maxrow = maxrow;
  run_items(P, L, part.data());

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
      // a sink logit is one more logit in the denominator, with a zero value
      float sink_logit = P.sink_logits ? P.sink_logits[kvh * P.G + g] : -INFINITY;
      float m = sink_logit;
      for (int64_t s = 0; s < splits; ++s) m = std::max(m, part[((head * splits + s) * R + r) * stride]);
      float m_use = m == -INFINITY ? 0.0f : m;
      float l = sink_logit == -INFINITY ? 0.0f : std::exp(sink_logit - m_use);
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

// the paged pool's attention (its op; its walk is included per set above)
#define GEAR_PAGED_OP
#include "cpu_paged_attention.h"
#undef GEAR_PAGED_OP

TORCH_LIBRARY_FRAGMENT(gear, m) {
  m.def("attention_cpu(Tensor q, Tensor[] k_parts, Tensor[] v_parts, Tensor? k_new, Tensor? v_new, "
        "Tensor? attn_mask, float scale, bool is_causal, int[] k_desc, int[] v_desc, "
        "float softcap=0., Tensor? sink_logits=None) -> Tensor");
  // the instruction set in use ("" asks; a name or "auto" picks): no tensors,
  // so it is registered with its function, for every dispatch key
  m.def("cpu_isa(str name='') -> str", &gear_cpu::cpu_isa);
  m.def("paged_attention_cpu(Tensor q, Tensor[] k_parts, Tensor[] v_parts, int[] k_desc, int[] v_desc, "
        "Tensor tail, Tensor sink, Tensor k_new, Tensor v_new, Tensor page_ptr, Tensor page_ids, "
        "Tensor row_info, int layer, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(gear, CPU, m) {
  m.impl("attention_cpu", &gear_cpu::attention_cpu);
  m.impl("paged_attention_cpu", &gear_cpu::paged_attention_cpu);
}

// LoRC's decode attention, K rebuilt from latents tile by tile (its own header)
#include "cpu_lorc_attention.h"
