// Scalar definitions shared by csrc/cuda/*.cu; the same functions as csrc/cpu/common.h and
// cxrkit/postprocess/_reference.py. NVRTC-safe: no host headers, explicit round-to-nearest
// intrinsics so the compiler cannot contract a*b+c into an FMA.
#pragma once

#include <cuda_fp16.h>

#define CXR_FULL_MASK 0xffffffffu

typedef unsigned long long cxr_u64;

__device__ __forceinline__ float cxr_inf() { return __int_as_float(0x7f800000); }

// Warp-wide min / max / or of all 32 lanes. __reduce_*_sync exists on sm_80 and later only; older
// GPUs (sm_70 / sm_75) get the same result from a butterfly of shuffles.
__device__ __forceinline__ int cxr_warp_min(int v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_min_sync(CXR_FULL_MASK, v);
#else
  for (int d = 16; d > 0; d >>= 1) v = min(v, __shfl_xor_sync(CXR_FULL_MASK, v, d));
  return v;
#endif
}

__device__ __forceinline__ int cxr_warp_max(int v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_max_sync(CXR_FULL_MASK, v);
#else
  for (int d = 16; d > 0; d >>= 1) v = max(v, __shfl_xor_sync(CXR_FULL_MASK, v, d));
  return v;
#endif
}

__device__ __forceinline__ unsigned int cxr_warp_or(unsigned int v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_or_sync(CXR_FULL_MASK, v);
#else
  for (int d = 16; d > 0; d >>= 1) v |= __shfl_xor_sync(CXR_FULL_MASK, v, d);
  return v;
#endif
}

// bfloat16 as its raw bits (no cuda_bf16.h needed): widening to float32 is exact, a 16-bit shift.
struct cxr_bf16 {
  unsigned short bits;
};

// Monotone map of non-NaN floats onto uint32 (-0.0 sorts just below +0.0; canonicalize first).
__device__ __forceinline__ unsigned int cxr_float_to_ordered(float f) {
  const unsigned int u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float cxr_ordered_to_float(unsigned int o) {
  return __uint_as_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}

// p = 1 / (1 + e) in float32, e = exp(-z) rounded once to float32 (through float64).
__device__ __forceinline__ float cxr_sigmoid(float z) {
  const float e = __double2float_rn(exp(-(double)z));
  return __fdiv_rn(1.0f, __fadd_rn(1.0f, e));
}

// IoU of two (x0, y0, x1, y1) boxes, each step rounded to float32.
__device__ __forceinline__ float cxr_iou(float ax0, float ay0, float ax1, float ay1,
                                         float bx0, float by0, float bx1, float by1) {
  const float area_a = __fmul_rn(__fsub_rn(ax1, ax0), __fsub_rn(ay1, ay0));
  const float area_b = __fmul_rn(__fsub_rn(bx1, bx0), __fsub_rn(by1, by0));
  const float iw = fmaxf(0.0f, __fsub_rn(fminf(ax1, bx1), fmaxf(ax0, bx0)));
  const float ih = fmaxf(0.0f, __fsub_rn(fminf(ay1, by1), fmaxf(ay0, by0)));
  const float inter = __fmul_rn(iw, ih);
  return __fdiv_rn(inter, __fsub_rn(__fadd_rn(area_a, area_b), inter));
}
