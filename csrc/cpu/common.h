// Shared scalar definitions of the post-processing ops (CPU). The same functions, written with
// CUDA intrinsics, live in csrc/cuda/common.cuh; the numpy ground truth is
// cxrkit/postprocess/_reference.py. Compile with -ffp-contract=off (no fused multiply-add).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace cxrkit {

// IEEE binary16 bits -> float32, exact (subnormals, inf and NaN included).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0x1fu) {
    bits = sign | 0x7f800000u | (man << 13);  // inf / NaN
  } else if (exp != 0) {
    bits = sign | ((exp + 112u) << 23) | (man << 13);  // normal: rebias 15 -> 127
  } else if (man == 0) {
    bits = sign;  // +-0
  } else {  // subnormal half -> normal float
    int e = -1;
    do {
      ++e;
      man <<= 1;
    } while ((man & 0x400u) == 0);
    bits = sign | (static_cast<uint32_t>(112 - e) << 23) | ((man & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Monotone map of non-NaN floats onto uint32 (-0.0 sorts just below +0.0).
inline uint32_t float_to_ordered(float f) {
  const uint32_t u = float_bits(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

inline float ordered_to_float(uint32_t o) {
  return bits_float((o & 0x80000000u) ? (o & 0x7fffffffu) : ~o);
}

// p = 1 / (1 + e) in float32, e = exp(-z) rounded once to float32 (through float64).
inline float sigmoid_f32(float z) {
  const double ed = std::exp(-static_cast<double>(z));
  const float e = ed > static_cast<double>(std::numeric_limits<float>::max())
                      ? std::numeric_limits<float>::infinity()  // what IEEE rounding gives; avoids UB
                      : static_cast<float>(ed);
  return 1.0f / (1.0f + e);
}

// Smallest non-NaN float z with sigmoid_f32(z) >= t (t <= 1). sigmoid_f32 is non-decreasing, so for
// non-NaN z: sigmoid_f32(z) >= t  <=>  z >= logit_floor(t). Lets region tests compare logits only.
// A bisection over the ordered floats in [lo, hi]; for 0 < t < 1 the bracket is first narrowed around
// float(log(t / (1 - t))), where the answer lies within a few ulps (galloping outwards from it), so a
// call costs ~4-8 sigmoid_f32 instead of 32. Same answer: the smallest z of a monotone predicate.
inline float logit_floor(float t) {
  const uint32_t lowest = float_to_ordered(-std::numeric_limits<float>::infinity());
  const uint32_t highest = float_to_ordered(std::numeric_limits<float>::infinity());  // sigmoid(+inf) = 1 >= t
  uint32_t lo = lowest, hi = highest;  // the answer lies in [lo, hi]
  auto pred = [t](uint32_t o) { return sigmoid_f32(ordered_to_float(o)) >= t; };
  if (t > 0.0f && t < 1.0f) {
    const double td = static_cast<double>(t);
    const uint32_t g = float_to_ordered(static_cast<float>(std::log(td / (1.0 - td))));
    uint32_t step = 1;
    if (pred(g)) {  // the answer is <= g: gallop down to a z below it
      hi = g;
      while (hi - lowest > step) {
        const uint32_t c = hi - step;
        if (!pred(c)) {
          lo = c + 1;
          break;
        }
        hi = c;
        step *= 2;
      }
    } else {  // the answer is > g: gallop up to a z at or above it
      lo = g + 1;
      while (highest - lo > step) {
        const uint32_t c = lo + step;
        if (pred(c)) {
          hi = c;
          break;
        }
        lo = c + 1;
        step *= 2;
      }
    }
  }
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo) / 2;
    if (pred(mid)) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return ordered_to_float(lo);
}

// IoU of two (x0, y0, x1, y1) boxes; each step rounded to float32 (build with -ffp-contract=off).
inline float iou_f32(const float* a, const float* b) {
  const float area_a = (a[2] - a[0]) * (a[3] - a[1]);
  const float area_b = (b[2] - b[0]) * (b[3] - b[1]);
  const float iw = std::fmax(0.0f, std::fmin(a[2], b[2]) - std::fmax(a[0], b[0]));
  const float ih = std::fmax(0.0f, std::fmin(a[3], b[3]) - std::fmax(a[1], b[1]));
  const float inter = iw * ih;
  return inter / ((area_a + area_b) - inter);
}

}  // namespace cxrkit
