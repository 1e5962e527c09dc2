// The vector micro-kernels of the CPU attention kernel (cpu_attention.cpp):
// what every instruction set shares, and the contract each one fulfils.
//
// One library holds three sets, picked at run time (cpu_attention.cpp:
// `active_isa`), so a library built on an AVX-512 machine runs on an AVX2-only
// one and the other way round. Each set is its own file, included by
// cpu_attention.cpp inside its own namespace under its own
// `#pragma GCC target`: only its functions may use its instructions, while
// library code (std::, ATen) stays compiled for the baseline.
//   cpu_simd_scalar.h   portable C++ (any CPU; on x86-64 the SSE2 baseline)
//   cpu_simd_avx2.h     AVX2 + FMA + F16C
//   cpu_simd_avx512.h   AVX-512 F/BW/VL/DQ (plus the AVX2 set), and the VNNI
//                       integer dots of the avx512vnni path
// No BF16/FP16 arithmetic: the codes are exact in either, but the other
// operand is not. Rounding q*s or the softmax weights to bf16 (fp16) moved
// fp32 outputs of the kernel tests' stores by ~4e-4 (~4e-5), 40x (4x) the
// fp32 bound, where VNNI's 21-bit integer limbs stay within 6e-7. On SmolLM2's
// real q/K/V (benchmarks/results/cpu_lowp_error.md) the scores in bf16 / fp16
// move the output by up to 3.7 % / 0.9 % of its scale, p.V in bf16 by 0.4 %:
// all above even a bf16 model's own output rounding (0.2 %). Only p.V with fp16
// operands and fp32 sums (0.05 %) would pass, for bf16 models alone.
//
// Each set defines, for rows of DP floats (DP: the head dim rounded up to
// 16) and tiles of one row per token, `ts` floats apart, whose padding past
// D holds finite values while q's padding is zero (so whole 16-float chunks
// can be read):
//   unpack_any       a packed row's codes as floats (planar layout, packing.py)
//   half_to_float    n fp16 values (raw bits) as floats
//   score_tile       out[r][j] = q_r . tile_j         (R rows x n tokens)
//   accumulate_tile  acc_r[d] += sum_j w[r][j] tile_j[d]   for d in [d0, d1)
//   exp_shifted      s[j] = exp(s[j] - m), returning the sum
//   max_of           max_j s[j] (-inf for n = 0)
//   dot, axpy        one vector: sum_j a[j] b[j];  y[j] += a x[j]
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// GCC's intrinsics carry their own target attributes: usable from a function
// compiled for that target, whatever the command line's -m flags
#define GEAR_X86_DISPATCH 1
#include <immintrin.h>
#endif

namespace gear_cpu {

constexpr int LANES = 16;          // rows are padded to a multiple of this many floats

// exp(x) for x <= 0 (0 below -87; NaN stays NaN), relative error ~2e-7:
// 2^(x log2 e) = 2^n * 2^f, n = round(.), 2^f by a degree-6 polynomial.
constexpr float kExpPoly[7] = {1.53533812e-4f, 1.33988257e-3f, 9.61838375e-3f, 5.55034290e-2f,
                               2.40226507e-1f, 6.93147182e-1f, 1.0f};
constexpr float kLog2e = 1.44269504088896341f;

inline float exp_neg(float x) {
  float y = x * kLog2e, n = std::nearbyint(y), f = y - n;
  float p = kExpPoly[0];
  for (int i = 1; i < 7; ++i) p = p * f + kExpPoly[i];
  return x < -87.0f ? 0.0f : std::ldexp(p, static_cast<int>(n));
}

}  // namespace gear_cpu
