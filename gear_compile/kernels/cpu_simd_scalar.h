// The portable micro-kernels (contract: cpu_simd.h): plain loops, for any CPU
// and for checking the vector sets against. `omp simd reduction` lets the
// compiler reorder the sums into vectors (the build has -fopenmp; torch's
// threads are not involved), which plain -O3 may not do for floats. Included by cpu_attention.cpp
// inside namespace gear_cpu::scalar, compiled for the build's baseline target
// (no #pragma once: each set is included into its own namespace).

// Codes of one packed row as floats. Planar packing: byte j holds channels
// j, j + W, j + 2W, ... in its low to high bit fields, so field f of all
// bytes is the channel run [f*W, (f+1)*W). `out` has room for (8/BITS)*W.
template <int BITS>
inline void unpack_codes(const uint8_t* bytes, int W, float* out) {
  constexpr int PB = 8 / BITS, MASK = (1 << BITS) - 1;
  for (int f = 0; f < PB; ++f)
    for (int j = 0; j < W; ++j) out[f * W + j] = static_cast<float>((bytes[j] >> (f * BITS)) & MASK);
}

inline void unpack_any(int bits, const uint8_t* bytes, int W, float* out) {
  if (bits == 2) unpack_codes<2>(bytes, W, out);
  else if (bits == 4) unpack_codes<4>(bytes, W, out);
  else unpack_codes<8>(bytes, W, out);
}

inline void half_to_float(const uint16_t* x, int n, float* out) {
  for (int i = 0; i < n; ++i) out[i] = c10::detail::fp16_ieee_to_fp32_value(x[i]);
}

inline void score_tile(const float* q, int R, int DP, const float* tile, int ts, int n,
                       float* out, int os) {
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < n; ++j) {
      float s = 0.0f;
#pragma omp simd reduction(+ : s)
      for (int d = 0; d < DP; ++d) s += q[r * DP + d] * tile[j * ts + d];
      out[r * os + j] = s;
    }
}

inline void accumulate_tile(const float* w, int ws, int R, int n, const float* tile, int ts,
                            float* acc, int DP, int d0, int d1) {
  for (int r = 0; r < R; ++r)
    for (int j = 0; j < n; ++j)
      for (int d = d0; d < d1; ++d) acc[r * DP + d] += w[r * ws + j] * tile[j * ts + d];
}

inline float dot(const float* a, const float* b, int n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int j = 0; j < n; ++j) s += a[j] * b[j];
  return s;
}

inline void axpy(float a, const float* x, float* y, int n) {
  for (int j = 0; j < n; ++j) y[j] += a * x[j];
}

inline float max_of(const float* s, int n) {
  float m = -INFINITY;
  for (int j = 0; j < n; ++j) m = s[j] > m ? s[j] : m;
  return m;
}

inline float exp_shifted(float* s, int n, float m) {
  float sum = 0.0f;
  for (int j = 0; j < n; ++j) sum += (s[j] = exp_neg(s[j] - m));
  return sum;
}
