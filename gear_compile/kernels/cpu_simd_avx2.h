// The AVX2 + FMA + F16C micro-kernels (contract: cpu_simd.h): 8 floats a
// register. Included by cpu_attention.cpp inside namespace gear_cpu::avx2
// under #pragma GCC target("avx2,fma,f16c"); run only where the CPU has them.

inline __m256 exp8(__m256 x) {
  __m256 y = _mm256_mul_ps(x, _mm256_set1_ps(kLog2e));
  __m256 n = _mm256_round_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_sub_ps(y, n);
  __m256 p = _mm256_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 7; ++i) p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(kExpPoly[i]));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  __m256 r = _mm256_mul_ps(p, _mm256_castsi256_ps(e));
  return _mm256_blendv_ps(r, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// NR rows x NT tokens of dot products, NR*NT independent accumulators (the
// FMA latency is hidden behind the others).
template <int NR, int NT>
inline void score_block(const float* q, int DP, const float* tile, int ts, float* out, int os) {
  __m256 acc[NR][NT];
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm256_setzero_ps();
  for (int d = 0; d < DP; d += 8) {
    __m256 c[NT];
    for (int t = 0; t < NT; ++t) c[t] = _mm256_loadu_ps(tile + t * ts + d);
    for (int r = 0; r < NR; ++r) {
      __m256 qv = _mm256_loadu_ps(q + r * DP + d);
      for (int t = 0; t < NT; ++t) acc[r][t] = _mm256_fmadd_ps(qv, c[t], acc[r][t]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NT; ++t) out[r * os + t] = hsum(acc[r][t]);
}

template <int NR>
inline void score_rows(const float* q, int DP, const float* tile, int ts, int n, float* out, int os) {
  constexpr int NT = NR <= 2 ? 4 : 2;
  int j = 0;
  for (; j + NT <= n; j += NT) score_block<NR, NT>(q, DP, tile + j * ts, ts, out + j, os);
  for (; j < n; ++j) score_block<NR, 1>(q, DP, tile + j * ts, ts, out + j, os);
}

// acc rows += w-weighted tile rows over channels [d0, d1), two 8-channel
// chunks at a time so that 2*NR accumulation chains run side by side.
template <int NR>
inline void accumulate_rows(const float* w, int ws, int n, const float* tile, int ts,
                            float* acc, int DP, int d0, int d1) {
  int d = d0;
  for (; d + 16 <= d1; d += 16) {
    __m256 a[NR][2];
    for (int r = 0; r < NR; ++r) {
      a[r][0] = _mm256_loadu_ps(acc + r * DP + d);
      a[r][1] = _mm256_loadu_ps(acc + r * DP + d + 8);
    }
    for (int t = 0; t < n; ++t) {
      __m256 c0 = _mm256_loadu_ps(tile + t * ts + d), c1 = _mm256_loadu_ps(tile + t * ts + d + 8);
      for (int r = 0; r < NR; ++r) {
        __m256 wv = _mm256_broadcast_ss(w + r * ws + t);
        a[r][0] = _mm256_fmadd_ps(wv, c0, a[r][0]);
        a[r][1] = _mm256_fmadd_ps(wv, c1, a[r][1]);
      }
    }
    for (int r = 0; r < NR; ++r) {
      _mm256_storeu_ps(acc + r * DP + d, a[r][0]);
      _mm256_storeu_ps(acc + r * DP + d + 8, a[r][1]);
    }
  }
  for (; d + 8 <= d1; d += 8) {
    __m256 a[NR];
    for (int r = 0; r < NR; ++r) a[r] = _mm256_loadu_ps(acc + r * DP + d);
    for (int t = 0; t < n; ++t) {
      __m256 c = _mm256_loadu_ps(tile + t * ts + d);
      for (int r = 0; r < NR; ++r) a[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(w + r * ws + t), c, a[r]);
    }
    for (int r = 0; r < NR; ++r) _mm256_storeu_ps(acc + r * DP + d, a[r]);
  }
  for (; d < d1; ++d)                       // a group narrower than 8 channels
    for (int r = 0; r < NR; ++r)
      for (int t = 0; t < n; ++t) acc[r * DP + d] += w[r * ws + t] * tile[t * ts + d];
}

// Codes of one packed row as floats (planar packing: cpu_simd_scalar.h).
template <int BITS>
inline void unpack_codes(const uint8_t* bytes, int W, float* out) {
  constexpr int PB = 8 / BITS, MASK = (1 << BITS) - 1;
  const __m256i mask = _mm256_set1_epi32(MASK);
  int j = 0;
  for (; j + 8 <= W; j += 8) {              // 8 bytes -> PB runs of 8 channels
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + j)));
    for (int f = 0; f < PB; ++f)
      _mm256_storeu_ps(out + f * W + j,
                       _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(b, f * BITS), mask)));
  }
  for (; j < W; ++j)
    for (int f = 0; f < PB; ++f) out[f * W + j] = static_cast<float>((bytes[j] >> (f * BITS)) & MASK);
}

inline void unpack_any(int bits, const uint8_t* bytes, int W, float* out) {
  if (bits == 2) unpack_codes<2>(bytes, W, out);
  else if (bits == 4) unpack_codes<4>(bytes, W, out);
  else unpack_codes<8>(bytes, W, out);
}

inline void half_to_float(const uint16_t* x, int n, float* out) {
  int i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + i))));
  for (; i < n; ++i) out[i] = _cvtsh_ss(x[i]);
}

inline void score_tile(const float* q, int R, int DP, const float* tile, int ts, int n,
                       float* out, int os) {
  int r = 0;
  for (; r + 4 <= R; r += 4) score_rows<4>(q + r * DP, DP, tile, ts, n, out + r * os, os);
  switch (R - r) {
    case 3: score_rows<3>(q + r * DP, DP, tile, ts, n, out + r * os, os); break;
    case 2: score_rows<2>(q + r * DP, DP, tile, ts, n, out + r * os, os); break;
    case 1: score_rows<1>(q + r * DP, DP, tile, ts, n, out + r * os, os); break;
  }
}

inline void accumulate_tile(const float* w, int ws, int R, int n, const float* tile, int ts,
                            float* acc, int DP, int d0, int d1) {
  int r = 0;
  for (; r + 4 <= R; r += 4) accumulate_rows<4>(w + r * ws, ws, n, tile, ts, acc + r * DP, DP, d0, d1);
  switch (R - r) {
    case 3: accumulate_rows<3>(w + r * ws, ws, n, tile, ts, acc + r * DP, DP, d0, d1); break;
    case 2: accumulate_rows<2>(w + r * ws, ws, n, tile, ts, acc + r * DP, DP, d0, d1); break;
    case 1: accumulate_rows<1>(w + r * ws, ws, n, tile, ts, acc + r * DP, DP, d0, d1); break;
  }
}

inline float dot(const float* a, const float* b, int n) {
  __m256 s0 = _mm256_setzero_ps(), s1 = s0;
  int j = 0;
  for (; j + 16 <= n; j += 16) {
    s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), s0);
    s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), s1);
  }
  float s = hsum(_mm256_add_ps(s0, s1));
  for (; j < n; ++j) s += a[j] * b[j];
  return s;
}

inline void axpy(float a, const float* x, float* y, int n) {
  __m256 av = _mm256_set1_ps(a);
  int j = 0;
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(y + j, _mm256_fmadd_ps(av, _mm256_loadu_ps(x + j), _mm256_loadu_ps(y + j)));
  for (; j < n; ++j) y[j] += a * x[j];
}

inline float max_of(const float* s, int n) {
  __m256 mv = _mm256_set1_ps(-INFINITY);
  int j = 0;
  for (; j + 8 <= n; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(s + j));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(mv), _mm256_extractf128_ps(mv, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  float m = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
  for (; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

inline float exp_shifted(float* s, int n, float m) {
  __m256 acc = _mm256_setzero_ps(), mv = _mm256_set1_ps(m);
  int j = 0;
  for (; j + 8 <= n; j += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + j), mv));
    _mm256_storeu_ps(s + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  float sum = hsum(acc);
  for (; j < n; ++j) sum += (s[j] = exp_neg(s[j] - m));
  return sum;
}
