// CPU kernels of cxrkit.postprocess (see cxrkit/postprocess/_reference.py for the definitions).
#pragma once

#include <cstdint>
#include <vector>

namespace cxrkit {

struct LocalizeParams {
  int64_t B = 0, K = 0, h = 0, w = 0;
  int max_peaks = 16;        // M
  int max_extent = 32;       // E
  float region_fraction = 0.5f;
  float iou_threshold = 0.3f;
};

struct LocalizeOut {
  int32_t* counts;  // (B, K)
  float* scores;    // (B, K, M)
  int32_t* points;  // (B, K, M, 2)
  float* boxes;     // (B, K, M, 4)
};

// heat is (B, K, h, w) float32 (is_half == false) or IEEE binary16 bits (is_half == true).
void localize_cpu(const void* heat, bool is_half, const float* t_logit, const LocalizeParams& prm,
                  const LocalizeOut& out, int num_threads);

// Greedy NMS per idxs group. Returns kept indices by score descending, ties by index ascending.
std::vector<int64_t> batched_nms_cpu(const float* boxes, const float* scores, const int64_t* idxs,
                                     int64_t n, float iou_threshold);

// Runs fn(i) for i in [0, n) on up to num_threads threads (<= 0: hardware concurrency).
template <typename Fn>
void parallel_for(int64_t n, int num_threads, Fn&& fn);

}  // namespace cxrkit

#include "parallel.h"
