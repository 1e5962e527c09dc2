// Paged flash-decoding on the CPU: attention of continuous-batching rows over
// a compressed paged pool (gear_compile/paged.py), reading every page where
// it lies in the pool's slabs through the block table: no page of a request
// is gathered into a contiguous copy, nothing is dequantized to a buffer.
// The torch reference it matches is paged_attention.attend.
//
// Job: rows r = 0..N-1 of T query tokens each (decode rows: T = 1, N of
// them; a prefill chunk with a past: N = 1, T its tokens), q [N, Hq, T, D].
// Row r's keys, in position order:
//   its sinks   exact, pool.sink[slot, layer, k|v, h, :s] (when in use: the
//               row has a compressed page), positions [0, s)
//   its pages   page_ids[page_ptr[r] .. page_ptr[r+1]), page j at positions
//               [j*n, (j+1)*n) (n = page tokens); the first page's first s
//               places hold copies (the sinks shadow them), so its walk
//               starts at token s. Page p of this layer is batch row
//               p * layers + layer of every slab part (the codec's segment
//               layout, described by k_desc / v_desc: the KERNEL_FIELDS of
//               store.py for one segment)
//   its tail    exact, pool.tail[slot, layer, k|v, h, :tail]
//   its new     this step's tokens, exact, k_new [H, sum T, D] at start
//               tokens      (causal among themselves when T > 1)
// row_info [N, 4] int64: (slot, tail, sinks in use, start).
//
// Algorithm: the walk of cpu_attention_kernel.h (attend_chunk: scores over
// the packed codes with per-channel stats folded into q, low-rank terms in
// rank space, outliers as tile-CSR records; online softmax; p.V folded), run
// over a list of runs instead of a store's four segments. Work items are
// (row, KV head, split of the row's positions), splits a whole number of
// pages, as many as give every thread about four items; an item's runs are
// the segments its split covers, each with its first and last token. Items
// of one (row, KV head) are merged by their log-sum-exp, as cpu_attention.cpp
// merges its splits.
//
// This file has two parts, chosen by GEAR_PAGED_OP: without it, the walk
// (`paged_items`), included by cpu_attention.cpp inside each instruction
// set's namespace after cpu_attention_kernel.h; with it, the op
// (`gear::paged_attention_cpu`: parsing, the split plan, the runs, the
// merge), included once after them. (No #pragma once: included per namespace.)

#ifndef GEAR_PAGED_OP

// The items [begin, end) of a paged call. item i: (row, KV head, first
// position, last position + 1, row's total positions), its runs [run_ptr[i],
// run_ptr[i+1]): (pos0, a, z, seg) walks tokens [a, z) of a segment whose
// token 0 is at position pos0; seg >= 0 indexes the exact segments `ex_k` /
// `ex_v` (already at their head), seg < 0 is slab row -seg - 1 (page * layers
// + layer) * Hkv + head of `slab_k` / `slab_v`. Partials go to
// part[i * R * (DP + 2)] as (m, l, acc[DP]) per query row.
void paged_items(const Problem& P, int64_t n_items, const int64_t* item, const int64_t* run_ptr,
                 const int64_t* runs, const SegBase& slab_k, const SegBase& slab_v, const Seg* ex_k,
                 const Seg* ex_v, int maxrank, int maxrow, float* part) {
  const int R = P.R, D = P.D, DP = P.DP;
  const int64_t stride = DP + 2;
  at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
    Scratch sc(P, maxrank, maxrow);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t* f = item + it * 5;
      const int row = static_cast<int>(f[0]), kvh = static_cast<int>(f[1]);
      const int64_t total = f[4];
      for (int g = 0; g < P.G; ++g)
        for (int i = 0; i < P.T; ++i)
          std::memcpy(sc.q.data() + (g * P.T + i) * DP,
                      P.q + ((static_cast<int64_t>(row) * P.Hq + kvh * P.G + g) * P.T + i) * D,
                      D * sizeof(float));
      State st(R, DP);
      for (int64_t u = run_ptr[it]; u < run_ptr[it + 1]; ++u) {
        const int64_t* w = runs + u * 4;
        const int64_t seg = w[3];
        const Seg K = seg >= 0 ? ex_k[seg] : slab_k.at(-seg - 1);
        const Seg V = seg >= 0 ? ex_v[seg] : slab_v.at(-seg - 1);
        sc.start_segment();
        for (int64_t t = w[1]; t < w[2]; t += CHUNK)
          attend_chunk(P, K, V, t, static_cast<int>(std::min<int64_t>(CHUNK, w[2] - t)), w[0], total,
                       row, kvh, sc, st);
        flush_v_lowrank(P, V, sc, st);
      }
      float* out = part + it * R * stride;
      for (int r = 0; r < R; ++r) {
        out[r * stride] = st.m[r];
        out[r * stride + 1] = st.l[r];
        std::memcpy(out + r * stride + 2, st.acc.data() + r * DP, DP * sizeof(float));
      }
    }
  });
}

#else  // GEAR_PAGED_OP

namespace gear_cpu {

// Rows [cap, D] of an exact tensor, from element `offset` on.
inline Seg exact_rows(const at::Tensor& t, int64_t offset, int64_t cap, int D) {
  Seg s;
  s.exact = true;
  s.cap = cap;
  s.block = static_cast<int>(std::max<int64_t>(cap, 1));
  s.W = D;
  s.data = static_cast<const char*>(t.data_ptr()) + offset * t.element_size();
  s.dtype = t.scalar_type();
  return s;
}

void run_paged(Problem& P, int64_t n_items, const int64_t* item, const int64_t* run_ptr, const int64_t* runs,
               const SegBase& sk, const SegBase& sv, const Seg* ek, const Seg* ev, int maxrank, int maxrow,
               float* part) {
  switch (static_cast<Isa>(active_isa().load())) {
#ifdef GEAR_X86_DISPATCH
    case Isa::avx512vnni:
      P.int_limbs = avx512::vnni_limbs;
      P.int_scores = avx512::vnni_scores;
      P.int_lowrank = avx512::vnni_lowrank;
      return avx512::paged_items(P, n_items, item, run_ptr, runs, sk, sv, ek, ev, maxrank, maxrow, part);
    case Isa::avx512:
      return avx512::paged_items(P, n_items, item, run_ptr, runs, sk, sv, ek, ev, maxrank, maxrow, part);
    case Isa::avx2:
      return avx2::paged_items(P, n_items, item, run_ptr, runs, sk, sv, ek, ev, maxrank, maxrow, part);
#endif
    default:
      return scalar::paged_items(P, n_items, item, run_ptr, runs, sk, sv, ek, ev, maxrank, maxrow, part);
  }
}

// gear::paged_attention_cpu (header comment). Returns [N, Hq, T, D] in q's dtype.
at::Tensor paged_attention_cpu(const at::Tensor& q_in, at::TensorList k_parts, at::TensorList v_parts,
                               at::IntArrayRef k_desc, at::IntArrayRef v_desc, const at::Tensor& tail_in,
                               const at::Tensor& sink_in, const at::Tensor& k_new_in, const at::Tensor& v_new_in,
                               const at::Tensor& page_ptr_in, const at::Tensor& page_ids_in,
                               const at::Tensor& row_info_in, int64_t layer, double scale) {
  TORCH_CHECK(q_in.dim() == 4, "gear paged_attention_cpu: q must be [N, Hq, T, D]");
  TORCH_CHECK(k_desc.size() == NFIELDS && v_desc.size() == NFIELDS,
              "gear paged_attention_cpu: a descriptor holds the ", NFIELDS, " fields of one segment");
  TORCH_CHECK(tail_in.dim() == 6 && sink_in.dim() == 6, "gear paged_attention_cpu: tail and sink must be "
              "[slots, layers, 2, H, tokens, D]");
  std::vector<at::Tensor> kp(k_parts.begin(), k_parts.end()), vp(v_parts.begin(), v_parts.end());
  for (auto& t : kp) t = t.contiguous();
  for (auto& t : vp) t = t.contiguous();
  const at::Tensor tail = tail_in.contiguous(), sink = sink_in.contiguous();
  const at::Tensor kn = k_new_in.contiguous(), vn = v_new_in.contiguous();
  const at::Tensor page_ptr = page_ptr_in.to(at::kLong).contiguous();
  const at::Tensor page_ids = page_ids_in.to(at::kLong).contiguous();
  const at::Tensor row_info = row_info_in.to(at::kLong).contiguous();

  Problem P;
  P.B = q_in.size(0); P.Hq = q_in.size(1); P.T = q_in.size(2); P.D = q_in.size(3);
  P.DP = (P.D + LANES - 1) / LANES * LANES;
  const SegBase sk = make_seg(kp, k_desc.data()), sv = make_seg(vp, v_desc.data());
  const at::Tensor& codes = kp[k_desc[CODES]];
  P.Hkv = codes.size(1);
  TORCH_CHECK(P.Hq % P.Hkv == 0, "gear paged_attention_cpu: query heads ", P.Hq,
              " are not a multiple of KV heads ", P.Hkv);
  TORCH_CHECK(tail.size(3) == P.Hkv && tail.size(5) == P.D && sink.size(3) == P.Hkv && kn.dim() == 3 &&
              kn.size(0) == P.Hkv && kn.size(2) == P.D && vn.sizes() == kn.sizes(),
              "gear paged_attention_cpu: tail, sink and k_new / v_new must have ", P.Hkv, " heads of ", P.D);
  P.G = P.Hq / P.Hkv;
  P.R = P.G * P.T;
  P.causal = P.T > 1;
  at::Tensor q = q_in.to(at::kFloat).mul(scale).contiguous();
  P.q = q.data_ptr<float>();

  const int64_t N = P.B, H = P.Hkv, T = P.T, D = P.D;
  const int64_t layers = tail.size(1), n = tail.size(4), s = sink.size(4), sum_t = kn.size(1);
  TORCH_CHECK(codes.size(0) % layers == 0, "gear paged_attention_cpu: slab rows must be pages * layers");
  TORCH_CHECK(layer >= 0 && layer < layers, "gear paged_attention_cpu: layer ", layer, " of ", layers);
  TORCH_CHECK(page_ptr.numel() == N + 1 && row_info.numel() == N * 4,
              "gear paged_attention_cpu: page_ptr [N + 1] and row_info [N, 4] for ", N, " rows");
  const int64_t* pp = page_ptr.data_ptr<int64_t>();
  const int64_t* ids = page_ids.data_ptr<int64_t>();
  const int64_t* info = row_info.data_ptr<int64_t>();
  const int64_t n_pages = codes.size(0) / layers;
  TORCH_CHECK(pp[0] == 0 && pp[N] <= page_ids.numel(), "gear paged_attention_cpu: page_ptr must start at 0 and "
              "end within page_ids");

  // each row's positions; the split: a whole number of pages, about four items a thread
  std::vector<int64_t> totals(N);
  int64_t work = 0;
  for (int64_t r = 0; r < N; ++r) {
    const int64_t np = pp[r + 1] - pp[r], tl = info[r * 4 + 1], start = info[r * 4 + 3];
    TORCH_CHECK(np >= 0, "gear paged_attention_cpu: page_ptr must not decrease (row ", r, ")");
    TORCH_CHECK(tl >= 0 && tl <= n && start >= 0 && start + T <= sum_t && info[r * 4] >= 0 &&
                info[r * 4] < tail.size(0), "gear paged_attention_cpu: row ", r, " reads past its tail slot or "
                "its new tokens");
    for (int64_t j = pp[r]; j < pp[r + 1]; ++j)
      TORCH_CHECK(ids[j] >= 0 && ids[j] < n_pages, "gear paged_attention_cpu: page ", ids[j], " of row ", r,
                  " is not in the pool's ", n_pages);
    totals[r] = np * n + tl + T;
    work += totals[r] * H;
  }
  const int64_t threads = at::get_num_threads();
  int64_t per_split = std::max<int64_t>(MIN_SPLIT, (work + 4 * threads - 1) / (4 * threads));
  per_split = (per_split + n - 1) / n * n;

  // exact segments of each (row, KV head): sinks, tail, new
  std::vector<Seg> ek(N * H * 3), ev(N * H * 3);
  std::vector<int64_t> item, run_ptr{0}, runs, head_ptr{0};
  int maxrank = std::max({1, sk.seg.rank, sv.seg.rank}), maxrow = static_cast<int>(D);
  for (const Seg& g : {sk.seg, sv.seg})
    maxrow = std::max(maxrow, g.exact ? g.W : (8 / std::max(g.bits, 1)) * g.W);
  for (int64_t r = 0; r < N; ++r) {
    const int64_t slot = info[r * 4], tl = info[r * 4 + 1], start = info[r * 4 + 3];
    const bool sinks = info[r * 4 + 2] != 0 && s > 0;
    const int64_t np = pp[r + 1] - pp[r], past = np * n;
    for (int64_t h = 0; h < H; ++h) {
      Seg* k3 = ek.data() + (r * H + h) * 3;
      Seg* v3 = ev.data() + (r * H + h) * 3;
      for (int kv = 0; kv < 2; ++kv) {
        Seg* e = kv ? v3 : k3;
        e[0] = exact_rows(sink, (((slot * layers + layer) * 2 + kv) * H + h) * s * D, s, D);
        e[1] = exact_rows(tail, (((slot * layers + layer) * 2 + kv) * H + h) * n * D, n, D);
        e[2] = exact_rows(kv ? vn : kn, (h * sum_t + start) * D, T, D);
      }
      const int64_t splits = (totals[r] + per_split - 1) / per_split;
      for (int64_t sp = 0; sp < splits; ++sp) {
        const int64_t lo = sp * per_split, hi = std::min(totals[r], lo + per_split);
        auto add = [&](int64_t pos0, int64_t first, int64_t len, int64_t seg) {
          const int64_t a = std::max(lo, pos0 + first) - pos0, z = std::min(hi, pos0 + len) - pos0;
          if (a < z) runs.insert(runs.end(), {pos0, a, z, seg});
        };
        if (sinks) add(0, 0, s, (r * H + h) * 3);
        for (int64_t j = lo / n; j < np && j * n < hi; ++j)
          add(j * n, j == 0 && sinks ? s : 0, n, -((ids[pp[r] + j] * layers + layer) * H + h) - 1);
        add(past, 0, tl, (r * H + h) * 3 + 1);
        add(past + tl, 0, T, (r * H + h) * 3 + 2);
        item.insert(item.end(), {r, h, lo, hi, totals[r]});
        run_ptr.push_back(static_cast<int64_t>(runs.size() / 4));
      }
      head_ptr.push_back(static_cast<int64_t>(item.size() / 5));
    }
  }
  const int R = P.R, DP = P.DP;
  const int64_t stride = DP + 2, n_items = static_cast<int64_t>(item.size() / 5);
  std::vector<float> part(n_items * R * stride);
  run_paged(P, n_items, item.data(), run_ptr.data(), runs.data(), sk, sv, ek.data(), ev.data(), maxrank,
            maxrow, part.data());

  // merge each (row, KV head)'s items by their log-sum-exp
  at::Tensor out = at::empty({N, P.Hq, T, D}, q_in.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  std::vector<float> merged(DP);
  for (int64_t head = 0; head < N * H; ++head) {
    const int64_t r0 = head / H, kvh = head % H;
    for (int r = 0; r < R; ++r) {
      const int g = r / P.T, i = r % P.T;
      float m = -INFINITY;
      for (int64_t it = head_ptr[head]; it < head_ptr[head + 1]; ++it) m = std::max(m, part[(it * R + r) * stride]);
      const float m_use = m == -INFINITY ? 0.0f : m;
      float l = 0.0f;
      std::fill(merged.begin(), merged.end(), 0.0f);
      for (int64_t it = head_ptr[head]; it < head_ptr[head + 1]; ++it) {
        const float* src = part.data() + (it * R + r) * stride;
        const float w = src[0] == -INFINITY ? 0.0f : std::exp(src[0] - m_use);
        l += w * src[1];
        for (int d = 0; d < DP; ++d) merged[d] += w * src[2 + d];
      }
      const float inv = 1.0f / l;
      float* dst = o + ((r0 * P.Hq + kvh * P.G + g) * T + i) * D;
      for (int d = 0; d < D; ++d) dst[d] = merged[d] * inv;
    }
  }
  return out.to(q_in.scalar_type());
}

}  // namespace gear_cpu

#endif  // GEAR_PAGED_OP
