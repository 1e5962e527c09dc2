// The AVX-512 micro-kernels (contract: cpu_simd.h): 16 floats a register,
// ragged ends by mask instead of scalar loops. Included by cpu_attention.cpp
// inside namespace gear_cpu::avx512 under
// #pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c");
// run only where the CPU has all of them (Intel Skylake-SP and later, AMD Zen 4).

inline __mmask16 first(int n) { return static_cast<__mmask16>((1u << n) - 1); }   // n < 16 lanes

inline __m512 exp16(__m512 x) {
  __m512 y = _mm512_mul_ps(x, _mm512_set1_ps(kLog2e));
  __m512 n = _mm512_roundscale_ps(y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 f = _mm512_sub_ps(y, n);
  __m512 p = _mm512_set1_ps(kExpPoly[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(kExpPoly[i]));
  __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  __m512 r = _mm512_mul_ps(p, _mm512_castsi512_ps(e));
  return _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ),
                            _mm512_setzero_ps());
}

// NR rows x NT tokens of dot products over DP (a multiple of 16) channels,
// NR*NT independent accumulators.
template <int NR, int NT>
inline void score_block(const float* q, int DP, const float* tile, int ts, float* out, int os) {
  __m512 acc[NR][NT];
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_setzero_ps();
  for (int d = 0; d < DP; d += 16) {
    __m512 c[NT];
    for (int t = 0; t < NT; ++t) c[t] = _mm512_loadu_ps(tile + t * ts + d);
    for (int r = 0; r < NR; ++r) {
      __m512 qv = _mm512_loadu_ps(q + r * DP + d);
      for (int t = 0; t < NT; ++t) acc[r][t] = _mm512_fmadd_ps(qv, c[t], acc[r][t]);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int t = 0; t < NT; ++t) out[r * os + t] = _mm512_reduce_add_ps(acc[r][t]);
}

template <int NR>
inline void score_rows(const float* q, int DP, const float* tile, int ts, int n, float* out, int os) {
  constexpr int NT = NR <= 2 ? 8 : 4;
  int j = 0;
  for (; j + NT <= n; j += NT) score_block<NR, NT>(q, DP, tile + j * ts, ts, out + j, os);
  for (; j < n; ++j) score_block<NR, 1>(q, DP, tile + j * ts, ts, out + j, os);
}

// acc rows += w-weighted tile rows over channels [d0, d1): two 16-channel
// chunks at a time (2*NR chains side by side), then one, then a masked end.
template <int NR>
inline void accumulate_rows(const float* w, int ws, int n, const float* tile, int ts,
                            float* acc, int DP, int d0, int d1) {
  int d = d0;
  for (; d + 32 <= d1; d += 32) {
    __m512 a[NR][2];
    for (int r = 0; r < NR; ++r) {
      a[r][0] = _mm512_loadu_ps(acc + r * DP + d);
      a[r][1] = _mm512_loadu_ps(acc + r * DP + d + 16);
    }
    for (int t = 0; t < n; ++t) {
      __m512 c0 = _mm512_loadu_ps(tile + t * ts + d), c1 = _mm512_loadu_ps(tile + t * ts + d + 16);
      for (int r = 0; r < NR; ++r) {
        __m512 wv = _mm512_set1_ps(w[r * ws + t]);
        a[r][0] = _mm512_fmadd_ps(wv, c0, a[r][0]);
        a[r][1] = _mm512_fmadd_ps(wv, c1, a[r][1]);
      }
    }
    for (int r = 0; r < NR; ++r) {
      _mm512_storeu_ps(acc + r * DP + d, a[r][0]);
      _mm512_storeu_ps(acc + r * DP + d + 16, a[r][1]);
    }
  }
  for (; d < d1; d += 16) {
    const __mmask16 m = d1 - d >= 16 ? static_cast<__mmask16>(0xFFFF) : first(d1 - d);
    __m512 a[NR];
    for (int r = 0; r < NR; ++r) a[r] = _mm512_maskz_loadu_ps(m, acc + r * DP + d);
    for (int t = 0; t < n; ++t) {
      __m512 c = _mm512_maskz_loadu_ps(m, tile + t * ts + d);
      for (int r = 0; r < NR; ++r) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(w[r * ws + t]), c, a[r]);
    }
    for (int r = 0; r < NR; ++r) _mm512_mask_storeu_ps(acc + r * DP + d, m, a[r]);
  }
}

// Codes of one packed row as floats (planar packing: cpu_simd_scalar.h):
// 16 bytes -> PB runs of 16 channels.
template <int BITS>
inline void unpack_codes(const uint8_t* bytes, int W, float* out) {
  constexpr int PB = 8 / BITS, MASK = (1 << BITS) - 1;
  const __m512i mask = _mm512_set1_epi32(MASK);
  for (int j = 0; j < W; j += 16) {
    const __mmask16 m = W - j >= 16 ? static_cast<__mmask16>(0xFFFF) : first(W - j);
    __m512i b = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, bytes + j));
    for (int f = 0; f < PB; ++f)
      _mm512_mask_storeu_ps(out + f * W + j, m,
                            _mm512_cvtepi32_ps(_mm512_and_si512(_mm512_srli_epi32(b, f * BITS), mask)));
  }
}

inline void unpack_any(int bits, const uint8_t* bytes, int W, float* out) {
  if (bits == 2) unpack_codes<2>(bytes, W, out);
  else if (bits == 4) unpack_codes<4>(bytes, W, out);
  else unpack_codes<8>(bytes, W, out);
}

inline void half_to_float(const uint16_t* x, int n, float* out) {
  for (int i = 0; i < n; i += 16) {
    const __mmask16 m = n - i >= 16 ? static_cast<__mmask16>(0xFFFF) : first(n - i);
    _mm512_mask_storeu_ps(out + i, m, _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, x + i)));
  }
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
  __m512 s0 = _mm512_setzero_ps(), s1 = s0;
  int j = 0;
  for (; j + 32 <= n; j += 32) {
    s0 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j), s0);
    s1 = _mm512_fmadd_ps(_mm512_loadu_ps(a + j + 16), _mm512_loadu_ps(b + j + 16), s1);
  }
  for (; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? static_cast<__mmask16>(0xFFFF) : first(n - j);
    s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + j), _mm512_maskz_loadu_ps(m, b + j), s0);
  }
  return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

inline void axpy(float a, const float* x, float* y, int n) {
  const __m512 av = _mm512_set1_ps(a);
  for (int j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? static_cast<__mmask16>(0xFFFF) : first(n - j);
    _mm512_mask_storeu_ps(y + j, m, _mm512_fmadd_ps(av, _mm512_maskz_loadu_ps(m, x + j),
                                                    _mm512_maskz_loadu_ps(m, y + j)));
  }
}

inline float max_of(const float* s, int n) {
  __m512 mv = _mm512_set1_ps(-INFINITY);
  for (int j = 0; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? static_cast<__mmask16>(0xFFFF) : first(n - j);
    mv = _mm512_mask_max_ps(mv, k, mv, _mm512_maskz_loadu_ps(k, s + j));
  }
  return _mm512_reduce_max_ps(mv);
}

inline float exp_shifted(float* s, int n, float m) {
  __m512 acc = _mm512_setzero_ps();
  const __m512 mv = _mm512_set1_ps(m);
  for (int j = 0; j < n; j += 16) {
    const __mmask16 k = n - j >= 16 ? static_cast<__mmask16>(0xFFFF) : first(n - j);
    __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, s + j), mv));
    _mm512_mask_storeu_ps(s + j, k, e);
    acc = _mm512_mask_add_ps(acc, k, acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}

// ------------------------------------------------------------ VNNI integer dots
// Folded K scores out[r][j] = q'_r . c_j for n tokens of packed rows (planar,
// `bits` a code, W bytes a row, W a multiple of 4) by vpdpbusd (unsigned code
// bytes times signed bytes, four at a time into int32): q' is held as 21-bit
// integers in three signed-byte limbs (kernel: quantize_limbs), so a score is
// scale_r * (2^14 h + 2^7 m + l) of three integer dots (vnni_limbs). Tokens sit in the
// lanes (16 at a time): a gather takes dword column c of 16 rows, i.e. the
// bytes 4c..4c+3 of each, whose bit field f holds channels f*W + 4c + i; the
// q' limb bytes of those four channels are broadcast. No horizontal sums, no
// float codes. Compiled with VNNI on top of the namespace's AVX-512 and
// called only where the CPU has it (cpu_attention.cpp: `active_isa`).
// limbs: [R][3][PB * W/4] int32, field-major; NU = PB * W/4 <= 64 (D <= 256).
// One row of q' as its limbs: h, m, l a byte per channel for nch channels
// (zero past D), *scale = max |q'| / 2^20 (1 for a zero row).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
void vnni_limbs(const float* q, int D, int nch, uint8_t* h, uint8_t* m, uint8_t* l, float* scale) {
  __m512 mx = _mm512_setzero_ps();
  for (int d = 0; d < D; d += 16)
    mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_maskz_loadu_ps(D - d >= 16 ? 0xFFFF : first(D - d), q + d)));
  const float top = _mm512_reduce_max_ps(mx);
  *scale = top > 0.0f ? top * 0x1p-20f : 1.0f;
  const __m512 inv = _mm512_set1_ps(1.0f / *scale);
  const __m512i low7 = _mm512_set1_epi32(127);
  for (int d = 0; d < nch; d += 16) {
    const __mmask16 in = D - d >= 16 ? 0xFFFF : D > d ? first(D - d) : 0;
    const __mmask16 out = nch - d >= 16 ? 0xFFFF : first(nch - d);
    __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(in, q + d), inv));
    _mm512_mask_cvtepi32_storeu_epi8(h + d, out, _mm512_srai_epi32(v, 14));
    _mm512_mask_cvtepi32_storeu_epi8(m + d, out, _mm512_and_si512(_mm512_srli_epi32(v, 7), low7));
    _mm512_mask_cvtepi32_storeu_epi8(l + d, out, _mm512_and_si512(v, low7));
  }
}

template <int NR>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
inline void vnni_rows(const __m512i* u, int nu, const int32_t* limbs, const float* scale,
                      float* out, int os, __mmask16 m) {
  __m512i acc[NR][3];
  for (int r = 0; r < NR; ++r)
    for (int l = 0; l < 3; ++l) acc[r][l] = _mm512_setzero_si512();
  for (int e = 0; e < nu; ++e)
    for (int r = 0; r < NR; ++r)
      for (int l = 0; l < 3; ++l)
        acc[r][l] = _mm512_dpbusd_epi32(acc[r][l], u[e], _mm512_set1_epi32(limbs[(r * 3 + l) * nu + e]));
  for (int r = 0; r < NR; ++r) {
    __m512 s = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][0]), _mm512_set1_ps(16384.0f),
                               _mm512_mul_ps(_mm512_cvtepi32_ps(acc[r][1]), _mm512_set1_ps(128.0f)));
    s = _mm512_mul_ps(_mm512_add_ps(s, _mm512_cvtepi32_ps(acc[r][2])), _mm512_set1_ps(scale[r]));
    _mm512_mask_storeu_ps(out + r * os, m, s);
  }
}

__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
void vnni_scores(const uint8_t* codes, int W, int bits, int n, const int32_t* limbs,
                 const float* scale, int R, float* out, int os) {
  const int cols = W / 4, pb = 8 / bits, nu = pb * cols;
  const __m512i fieldmask = _mm512_set1_epi8(static_cast<char>((1 << bits) - 1));
  const __m512i rows = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                          _mm512_set1_epi32(cols));
  __m512i u[64];
  for (int j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? static_cast<__mmask16>(0xFFFF) : first(n - j);
    const int* base = reinterpret_cast<const int*>(codes + static_cast<int64_t>(j) * W);
    for (int c = 0; c < cols; ++c) {
      __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m,
                                              _mm512_add_epi32(rows, _mm512_set1_epi32(c)), base, 4);
      for (int f = 0; f < pb; ++f)
        u[f * cols + c] = bits == 8 ? g : _mm512_and_si512(_mm512_srli_epi32(g, f * bits), fieldmask);
    }
    int r = 0;
    for (; r + 3 <= R; r += 3) vnni_rows<3>(u, nu, limbs + r * 3 * nu, scale + r, out + r * os + j, os, m);
    if (R - r == 2) vnni_rows<2>(u, nu, limbs + r * 3 * nu, scale + r, out + r * os + j, os, m);
    else if (R - r == 1) vnni_rows<1>(u, nu, limbs + r * 3 * nu, scale + r, out + r * os + j, os, m);
  }
}

// The low-rank K term by the same integer dots: out[r][j] += (q.B diag(s))_r . A_j
// for n tokens whose rank-rk rows of A (int8, rk 1, 2 or 4) fit a dword each.
// vpdpbusd wants the unsigned operand: A + 128 (its bytes xor 0x80), whose
// excess 128 * sum_k limb_k per row and limb is `bias`, taken off in int32
// (exact). limbs: [R][3] int32 (vnni_limbs of the rank-space row, rk bytes).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")))
void vnni_lowrank(const int8_t* a, int rk, int n, const int32_t* limbs, const int32_t* bias,
                  const float* scale, int R, float* out, int os) {
  const __m512i flip = _mm512_set1_epi32(static_cast<int32_t>(0x80808080u));
  for (int j = 0; j < n; j += 16) {
    const __mmask16 m = n - j >= 16 ? static_cast<__mmask16>(0xFFFF) : first(n - j);
    __m512i u;
    if (rk == 4) u = _mm512_maskz_loadu_epi32(m, a + j * 4);
    else if (rk == 2) u = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, a + j * 2));
    else u = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, a + j));
    u = _mm512_xor_si512(u, flip);             // bytes past rk meet zero limb bytes
    for (int r = 0; r < R; ++r) {
      __m512 s = _mm512_setzero_ps();
      for (int l = 0; l < 3; ++l) {
        __m512i d = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u, _mm512_set1_epi32(limbs[r * 3 + l])),
                                     _mm512_set1_epi32(bias[r * 3 + l]));
        s = _mm512_fmadd_ps(s, _mm512_set1_ps(128.0f), _mm512_cvtepi32_ps(d));
      }
      float* o = out + r * os + j;
      _mm512_mask_storeu_ps(o, m, _mm512_fmadd_ps(s, _mm512_set1_ps(scale[r]), _mm512_maskz_loadu_ps(m, o)));
    }
  }
}
