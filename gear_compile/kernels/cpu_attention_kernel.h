// One work item's walk over the compressed store (the body of
// cpu_attention.cpp's algorithm), written once and compiled once per
// instruction set: cpu_attention.cpp includes it inside gear_cpu::scalar,
// gear_cpu::avx2 and gear_cpu::avx512, each after that set's micro-kernels
// (cpu_simd_*.h) and under that set's #pragma GCC target, so the loops
// written here are also vectorized for that set. Reads the shared types
// (Seg, Problem, Plan, Scratch, State) defined before the includes.
// (No #pragma once: included once per namespace.)

template <typename T>
inline void convert_row(const T* x, int n, float* out) {
  for (int i = 0; i < n; ++i) out[i] = static_cast<float>(x[i]);
}

// Row t of an exact segment, as floats (the padding past D is left as it is).
inline void exact_row(const Seg& s, int64_t t, int D, float* out) {
  switch (s.dtype) {
    case at::kFloat: std::memcpy(out, static_cast<const float*>(s.data) + t * D, D * sizeof(float)); break;
    case at::kHalf: half_to_float(reinterpret_cast<const uint16_t*>(static_cast<const at::Half*>(s.data) + t * D),
                                  D, out); break;
    default: convert_row(static_cast<const at::BFloat16*>(s.data) + t * D, D, out); break;
  }
}

inline void half_row(const at::Half* x, int n, float* out) {
  half_to_float(reinterpret_cast<const uint16_t*>(x), n, out);
}

// K outliers of tokens [t0, t0+n), added to the tile of codes: each is a
// signed number of units of its group's step (`outliers.steps`). A block's
// records of record tiles [j0, j1) are [ptr[j0], ptr[j1]), in token order; a
// record's token is its tile's 256-token base plus the stored low byte. Only
// a chunk starting or ending inside a record tile skips records of it.
// Positions are 16 bits (read unsigned from the int16 tensor) or 32. Each
// record goes to add(token - t0, channel, value in steps).
template <typename I, typename Add>
void k_outliers_as(const Seg& K, const I* positions, int64_t t0, int n, Add add) {
  const uint32_t channel_mask = (1u << K.channel_bits) - 1;
  for (int64_t t = t0; t < t0 + n;) {
    int64_t blk = t / K.block;
    int lo = static_cast<int>(t - blk * K.block);
    int hi = static_cast<int>(std::min<int64_t>(t0 + n - blk * K.block, K.block));
    const int32_t* ptr = K.out_ptr + blk * K.ptrs;
    const I* pos = positions + blk * K.k2;       // the block's records: k2 = 2k * D of them
    const int8_t* val = K.out_val + blk * K.k2;
    const int shift = static_cast<int>(t0 - blk * K.block);     // block offset of token t0
    for (int j = lo / TILE; j * TILE < hi; ++j) {
      const int base = (j * TILE) & ~255;
      for (int r = ptr[j]; r < ptr[j + 1]; ++r) {
        const uint32_t p = pos[r];
        const int tok = base + static_cast<int>((p >> K.channel_bits) & 255);
        if (tok < lo || tok >= hi) continue;
        add(tok - shift, p & channel_mask, static_cast<float>(val[r]) * K.out_unit);
      }
    }
    t = blk * K.block + hi;
  }
}

template <typename Add>
inline void k_outliers(const Seg& K, int64_t t0, int n, Add add) {
  if (K.idx_type == at::kShort) k_outliers_as(K, static_cast<const uint16_t*>(K.out_idx), t0, n, add);
  else k_outliers_as(K, static_cast<const uint32_t*>(K.out_idx), t0, n, add);
}

// The K outliers of tokens [t0, t0+n) folded into the scores of R rows:
// out[r * CHUNK + j] += q'_r,c * steps, q' = qs (rows DP apart). The same
// walk as k_outliers_as, written out with the row count a template argument
// where it is small (the GQA ratio; 0: R at run time) so that a record's
// adds stay in registers instead of a closure's spilled fields.
template <int NR, typename I>
void k_outliers_folded_as(const Seg& K, const I* positions, int64_t t0, int n, const float* qs,
                          int DP, int R, float* out) {
  const int rows = NR ? NR : R;
  const int cbits = K.channel_bits;
  const uint32_t cmask = (1u << cbits) - 1;
  const float unit = K.out_unit;
  for (int64_t t = t0; t < t0 + n;) {
    const int64_t blk = t / K.block;
    const int lo = static_cast<int>(t - blk * K.block);
    const int hi = static_cast<int>(std::min<int64_t>(t0 + n - blk * K.block, K.block));
    const int32_t* ptr = K.out_ptr + blk * K.ptrs;
    const I* pos = positions + blk * K.k2;
    const int8_t* val = K.out_val + blk * K.k2;
    const int shift = static_cast<int>(t0 - blk * K.block);     // block offset of token t0
    for (int j = lo / TILE; j * TILE < hi; ++j) {
      const int base = (j * TILE) & ~255;
      const bool inside = j * TILE >= lo && (j + 1) * TILE <= hi;
      for (int r = ptr[j]; r < ptr[j + 1]; ++r) {
        const uint32_t p = pos[r];
        const int tok = base + static_cast<int>((p >> cbits) & 255);
        if (!inside && (tok < lo || tok >= hi)) continue;
        const float v = static_cast<float>(val[r]) * unit;
        const float* q = qs + (p & cmask);
        float* o = out + (tok - shift);
        for (int i = 0; i < rows; ++i) o[i * CHUNK] += q[i * DP] * v;
      }
    }
    t = blk * K.block + hi;
  }
}

template <int NR>
inline void k_outliers_folded_rows(const Seg& K, int64_t t0, int n, const float* qs, int DP, int R, float* out) {
  if (K.idx_type == at::kShort)
    k_outliers_folded_as<NR>(K, static_cast<const uint16_t*>(K.out_idx), t0, n, qs, DP, R, out);
  else
    k_outliers_folded_as<NR>(K, static_cast<const uint32_t*>(K.out_idx), t0, n, qs, DP, R, out);
}

inline void k_outliers_folded(const Seg& K, int64_t t0, int n, const float* qs, int DP, int R, float* out) {
  switch (R) {
    case 1: return k_outliers_folded_rows<1>(K, t0, n, qs, DP, R, out);
    case 2: return k_outliers_folded_rows<2>(K, t0, n, qs, DP, R, out);
    case 3: return k_outliers_folded_rows<3>(K, t0, n, qs, DP, R, out);
    case 4: return k_outliers_folded_rows<4>(K, t0, n, qs, DP, R, out);
    default: return k_outliers_folded_rows<0>(K, t0, n, qs, DP, R, out);
  }
}

// V outliers of tokens [t0, t0+n) into the tile: 2k (channel, steps) per
// token; channels are one byte up to 256 of them (outliers.index_dtype).
template <typename I>
inline void v_outliers_as(const Seg& V, const I* idx, int64_t t0, int n, Scratch& sc) {
  const int8_t* val = V.out_val + t0 * V.k2;
  idx += t0 * V.k2;
  for (int j = 0; j < n; ++j, idx += V.k2, val += V.k2) {
    float* row = sc.tile_row(j);
    for (int e = 0; e < V.k2; ++e) row[idx[e]] += static_cast<float>(val[e]) * V.out_unit;
  }
}

inline void v_outliers(const Seg& V, int64_t t0, int n, Scratch& sc) {
  switch (V.idx_type) {
    case at::kByte: return v_outliers_as(V, static_cast<const uint8_t*>(V.out_idx), t0, n, sc);
    case at::kShort: return v_outliers_as(V, static_cast<const int16_t*>(V.out_idx), t0, n, sc);
    default: return v_outliers_as(V, static_cast<const int32_t*>(V.out_idx), t0, n, sc);
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
  float* a = sc.row.data();
  float* z = sc.row2.data();
  for (int j = 0; j < n; ++j) {
    int64_t t = t0 + j;
    float* row = sc.tile_row(j);
    if (s.channel) {                       // per-channel stats of the token group
      half_row(s.scale + (t / s.group) * D, D, a);
      half_row(s.zero + (t / s.group) * D, D, z);
      for (int d = 0; d < D; ++d) row[d] = row[d] * a[d] + z[d];
    } else {                               // per-token stats of each channel group
      const int ng = D / s.group;
      for (int g = 0; g < ng; ++g) {
        float sg = to_f(s.scale[t * ng + g]), zg = to_f(s.zero[t * ng + g]);
        for (int d = g * s.group; d < (g + 1) * s.group; ++d) row[d] = row[d] * sg + zg;
      }
    }
  }
}

// The low-rank A rows of tokens [t0, t0+n), transposed: at[k * CHUNK + j].
// The rank is a template argument where it is the paper's (r_g = 2, r_p = 4),
// so the strided byte reads vectorize.
template <int RK>
inline void load_a_rank(const int8_t* a, int n, float* at) {
  for (int k = 0; k < RK; ++k)
    for (int j = 0; j < n; ++j) at[k * CHUNK + j] = static_cast<float>(a[j * RK + k]);
}

inline void load_a(const Seg& s, int64_t t0, int n, Scratch& sc) {
  const int8_t* a = s.lr_a + t0 * s.rank;
  switch (s.rank) {
    case 2: return load_a_rank<2>(a, n, sc.at.data());
    case 4: return load_a_rank<4>(a, n, sc.at.data());
    default:
      for (int k = 0; k < s.rank; ++k)
        for (int j = 0; j < n; ++j) sc.at[k * CHUNK + j] = static_cast<float>(a[j * s.rank + k]);
  }
}

// The block's low-rank B diag(lr_s), as `rank` rows of DP floats (brow[k]
// = B_blk[:, k] * lr_s[blk, k], zero past D).
void load_b(const Seg& s, int64_t blk, int D, int DP, Scratch& sc) {
  const int8_t* Bm = s.lr_b + blk * D * s.rank;
  const float* sk = s.lr_s + blk * s.rank;
  for (int k = 0; k < s.rank; ++k) {
    float* out = sc.brow.data() + k * DP;
    for (int d = 0; d < D; ++d) out[d] = static_cast<float>(Bm[d * s.rank + k]) * sk[k];
  }
}

// q' = q*s (sc.qs) as 21-bit integers in three signed-byte limbs, for the
// integer dots (P.int_limbs, P.int_scores): q'_d ~ scale * (2^14 h + 2^7 m + l),
// l and m in [0, 127], h in [-64, 64], scale = max_d |q'_d| / 2^20 per row
// (so the rounding is at most 2^-21 of the row's largest entry). Limb l of
// row r is a byte per channel, PB*W channels (zero past D): the four bytes
// of a code dword's field f at column c are channels f*W + 4c .. f*W + 4c + 3,
// so the bytes read as int32 are the broadcasts the dots need.
void quantize_limbs(const Problem& P, const Seg& K, Scratch& sc) {
  const int nch = (8 / K.bits) * K.W, nu = nch / 4;
  for (int r = 0; r < P.R; ++r) {
    auto limb = [&](int l) { return reinterpret_cast<uint8_t*>(sc.limbs.data() + (r * 3 + l) * nu); };
    P.int_limbs(sc.qs.data() + r * P.DP, P.D, nch, limb(0), limb(1), limb(2), sc.lscale.data() + r);
  }
}

// q.B diag(s) (sc.qb, R rows of rk) as limbs for P.int_lowrank: one dword
// per row and limb (rk <= 4 bytes), and each one's bias 128 * sum of its
// signed bytes (the kernel feeds A + 128).
void quantize_rank_limbs(const Problem& P, int rk, Scratch& sc) {
  for (int r = 0; r < P.R; ++r) {
    int32_t* w = sc.lr_limbs.data() + r * 3;
    P.int_limbs(sc.qb.data() + r * rk, rk, 4, reinterpret_cast<uint8_t*>(w), reinterpret_cast<uint8_t*>(w + 1),
                reinterpret_cast<uint8_t*>(w + 2), sc.lr_scale.data() + r);
    for (int l = 0; l < 3; ++l) {
      const uint32_t word = static_cast<uint32_t>(w[l]);
      int32_t sum = 0;
      for (int i = 0; i < 4; ++i) sum += static_cast<int8_t>(static_cast<uint8_t>(word >> (8 * i)));
      sc.lr_bias[r * 3 + l] = 128 * sum;
    }
  }
}

// Scores of tokens [t0, t0+n) of a K segment into sc.score[r * CHUNK + j].
// Folded K by integer dots where the set has them (P.int_scores): the codes
// are never turned into floats, and the outliers join the scores as
// q'_c * steps instead of joining the codes.
void score_chunk(const Problem& P, const Seg& K, int64_t t0, int n, Scratch& sc) {
  const int R = P.R, D = P.D, DP = P.DP;
  float* score = sc.score.data();
  const bool fold = !K.exact && K.channel;   // per-channel stats fold into q
  const bool int_dots = fold && P.int_scores && K.W % 4 == 0 && (8 / K.bits) * (K.W / 4) <= MAX_QUADS;
  if (!int_dots) {
    load_tile(K, t0, n, D, sc);
    if (K.k2) k_outliers(K, t0, n, [&](int j, uint32_t c, float v) { sc.tile_row(j)[c] += v; });
  }
  if (!fold && !K.exact) rebuild_tile(K, t0, n, D, sc);
  if (!fold) {
    score_tile(sc.q.data(), R, DP, sc.tile.data(), sc.ts, n, score, CHUNK);
  } else {                                 // q.k_t = (q*s).c_t + q.z, per token group
    for (int j0 = 0; j0 < n;) {
      int64_t group = (t0 + j0) / K.group;
      int j1 = static_cast<int>(std::min<int64_t>(n, (group + 1) * K.group - t0));
      if (sc.qs_key != K.scale + group * D) {   // q*s and q.z once per token group
        sc.qs_key = K.scale + group * D;
        half_row(K.scale + group * D, D, sc.row.data());
        for (int r = 0; r < R; ++r)
          for (int d = 0; d < D; ++d) sc.qs[r * DP + d] = sc.q[r * DP + d] * sc.row[d];
        half_row(K.zero + group * D, D, sc.row.data());
        score_tile(sc.q.data(), R, DP, sc.row.data(), 0, 1, sc.qz.data(), 1);
        if (int_dots) quantize_limbs(P, K, sc);
      }
      if (int_dots) {
        P.int_scores(static_cast<const uint8_t*>(K.data) + (t0 + j0) * K.W, K.W, K.bits, j1 - j0,
                     sc.limbs.data(), sc.lscale.data(), R, score + j0, CHUNK);
        if (K.k2) k_outliers_folded(K, t0 + j0, j1 - j0, sc.qs.data(), DP, R, score + j0);
      } else {
        score_tile(sc.qs.data(), R, DP, sc.tile_row(j0), sc.ts, j1 - j0, score + j0, CHUNK);
      }
      for (int r = 0; r < R; ++r)
        for (int j = j0; j < j1; ++j) score[r * CHUNK + j] += sc.qz[r];
      j0 = j1;
    }
  }
  if (K.exact || !K.rank) return;
  // (q . B_blk diag(s)) . A_t: q's rank-space image once per block, then a
  // rank-long dot per token
  // (integer dots where the folded K takes them and A's rows fit a dword)
  const int rk = K.rank;
  const bool int_lr = int_dots && (rk == 1 || rk == 2 || rk == 4);
  if (!int_lr) load_a(K, t0, n, sc);
  for (int j0 = 0; j0 < n;) {
    int64_t blk = (t0 + j0) / K.block;
    int j1 = static_cast<int>(std::min<int64_t>(n, (blk + 1) * K.block - t0));
    if (sc.qb_key != K.lr_b + blk * D * rk) {
      sc.qb_key = K.lr_b + blk * D * rk;
      load_b(K, blk, D, DP, sc);
      score_tile(sc.q.data(), R, DP, sc.brow.data(), DP, rk, sc.qb.data(), rk);
      if (int_lr) quantize_rank_limbs(P, rk, sc);
    }
    if (int_lr) {
      P.int_lowrank(K.lr_a + (t0 + j0) * rk, rk, j1 - j0, sc.lr_limbs.data(), sc.lr_bias.data(),
                    sc.lr_scale.data(), R, score + j0, CHUNK);
    } else {
      for (int r = 0; r < R; ++r)
        for (int k = 0; k < rk; ++k)
          axpy(sc.qb[r * rk + k], sc.at.data() + k * CHUNK + j0, score + r * CHUNK + j0, j1 - j0);
    }
    j0 = j1;
  }
}

// acc += (sum_t p_t A_t) diag(s) B_blk^T for the block whose p.A the scratch
// holds in rank space, then that sum starts over.
void flush_v_lowrank(const Problem& P, const Seg& V, Scratch& sc, State& st) {
  if (sc.pa_blk < 0) return;
  load_b(V, sc.pa_blk, P.D, P.DP, sc);
  accumulate_tile(sc.pa.data(), V.rank, P.R, V.rank, sc.brow.data(), P.DP, st.acc.data(), P.DP, 0, P.DP);
  std::fill(sc.pa.begin(), sc.pa.end(), 0.0f);
  sc.pa_blk = -1;
}

// acc_r += sum_j p[r][j] V_{t0+j}. Per-token V stats fold into the weights,
// (p*s) . c + (p.z), the zero-point sums joining acc once per chunk; the
// low-rank V term is summed in rank space (p . A) and goes through B^T once
// per block (flush_v_lowrank).
void value_chunk(const Problem& P, const Seg& V, int64_t t0, int n, Scratch& sc, State& st) {
  const int R = P.R, D = P.D, DP = P.DP;
  const float* p = sc.score.data();
  float* acc = st.acc.data();
  const bool fold = !V.exact && !V.channel;
  load_tile(V, t0, n, D, sc);
  if (V.k2) v_outliers(V, t0, n, sc);
  if (!fold && !V.exact) rebuild_tile(V, t0, n, D, sc);
  if (!fold) {
    accumulate_tile(p, CHUNK, R, n, sc.tile.data(), sc.ts, acc, DP, 0, DP);
  } else {
    const int ng = D / V.group;
    half_row(V.scale + t0 * ng, n * ng, sc.sa.data());   // the chunk's [n, ng] stats at once
    half_row(V.zero + t0 * ng, n * ng, sc.za.data());
    for (int g = 0; g < ng; ++g) {
      const float *sg = sc.sa.data(), *zg = sc.za.data();
      if (ng > 1) {                         // group g's column
        for (int j = 0; j < n; ++j) {
          sc.sg[j] = sc.sa[j * ng + g];
          sc.zg[j] = sc.za[j * ng + g];
        }
        sg = sc.sg.data();
        zg = sc.zg.data();
      }
      for (int r = 0; r < R; ++r) {
        const float* pr = p + r * CHUNK;
        float* wr = sc.w.data() + r * CHUNK;
        for (int j = 0; j < n; ++j) wr[j] = pr[j] * sg[j];
        float z = dot(pr, zg, n);
        const int d1 = ng == 1 ? D : (g + 1) * V.group;
        for (int d = g * V.group; d < d1; ++d) acc[r * DP + d] += z;
      }
      accumulate_tile(sc.w.data(), CHUNK, R, n, sc.tile.data(), sc.ts, acc, DP,
                      g * V.group, ng == 1 ? DP : (g + 1) * V.group);
    }
  }
  if (V.exact || !V.rank) return;
  const int rk = V.rank;
  load_a(V, t0, n, sc);
  for (int j0 = 0; j0 < n;) {
    int64_t blk = (t0 + j0) / V.block;
    int j1 = static_cast<int>(std::min<int64_t>(n, (blk + 1) * V.block - t0));
    if (blk != sc.pa_blk) {
      flush_v_lowrank(P, V, sc, st);
      sc.pa_blk = blk;
    }
    for (int r = 0; r < R; ++r)
      for (int k = 0; k < rk; ++k)
        sc.pa[r * rk + k] += dot(p + r * CHUNK + j0, sc.at.data() + k * CHUNK + j0, j1 - j0);
    j0 = j1;
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
    float m_new = std::max(st.m[r], max_of(s, n));
    float m_use = m_new == -INFINITY ? 0.0f : m_new;
    float alpha = st.m[r] == -INFINITY ? 0.0f : exp_neg(st.m[r] - m_use);
    st.l[r] = st.l[r] * alpha + exp_shifted(s, n, m_use);
    st.m[r] = m_new;
    if (alpha != 1.0f) {                    // the running sums, the rank-space one too
      float* acc = st.acc.data() + r * DP;
      for (int d = 0; d < DP; ++d) acc[d] *= alpha;
      for (int k = 0; k < V.rank; ++k) sc.pa[r * V.rank + k] *= alpha;
    }
  }
  value_chunk(P, V, t0, n, sc, st);
}

// Every work item (batch, KV head, split of the tokens) on torch's threads;
// item i's rows go to part[i * R * (DP + 2) ...] as (m, l, acc[DP]).
void run_items(const Problem& P, const Plan& L, float* part) {
  const int R = P.R, D = P.D, DP = P.DP;
  const int64_t stride = DP + 2;
  at::parallel_for(0, L.heads * L.splits, 1, [&](int64_t begin, int64_t end) {
    Scratch sc(P, L.maxrank, L.maxrow);
    for (int64_t item = begin; item < end; ++item) {
      int64_t head = item / L.splits, split = item % L.splits;
      int b = static_cast<int>(head / P.Hkv), kvh = static_cast<int>(head % P.Hkv);
      for (int g = 0; g < P.G; ++g)
        for (int i = 0; i < P.T; ++i)
          std::memcpy(sc.q.data() + (g * P.T + i) * DP,
                      P.q + ((static_cast<int64_t>(b) * P.Hq + kvh * P.G + g) * P.T + i) * D,
                      D * sizeof(float));
      State st(R, DP);
      int64_t lo = split * L.per_split, hi = std::min(L.total, lo + L.per_split);
      for (int s = 0; s < NSEG; ++s) {
        int64_t a = std::max(lo, L.pos0[s] + L.first[s]) - L.pos0[s];
        int64_t z = std::min(hi, L.pos0[s] + L.lens[s]) - L.pos0[s];
        if (a >= z) continue;
        Seg K = L.ks[s].at(head), V = L.vs[s].at(head);
        sc.start_segment();
        for (int64_t t = a; t < z; t += CHUNK)
          attend_chunk(P, K, V, t, static_cast<int>(std::min<int64_t>(CHUNK, z - t)),
                       L.pos0[s], L.total, b, kvh, sc, st);
        flush_v_lowrank(P, V, sc, st);
      }
      float* out = part + item * R * stride;
      for (int r = 0; r < R; ++r) {
        out[r * stride] = st.m[r];
        out[r * stride + 1] = st.l[r];
        std::memcpy(out + r * stride + 2, st.acc.data() + r * DP, DP * sizeof(float));
      }
    }
  });
}
