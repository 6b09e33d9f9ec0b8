// Greedy batched NMS (torchvision semantics): same function as
// cxrkit/postprocess/_reference.py::batched_nms_reference.
#include <algorithm>
#include <cmath>
#include <numeric>
#include <unordered_map>
#include <vector>

#include "common.h"
#include "localize.h"

namespace cxrkit {

std::vector<int64_t> batched_nms_cpu(const float* boxes, const float* scores, const int64_t* idxs,
                                     int64_t n, float iou_threshold) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), int64_t{0});
  // Score descending, index ascending (-0.0 == +0.0 under float compare); NaN scores after every
  // number (-inf included), index ascending among them. A strict weak order for any input: a plain
  // `>` comparator with NaNs breaks std::sort's precondition (undefined behaviour).
  std::sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const float sa = scores[a], sb = scores[b];
    const bool na = std::isnan(sa), nb = std::isnan(sb);
    if (na || nb) return na == nb ? a < b : nb;
    return sa > sb || (sa == sb && a < b);
  });
  // Boxes of different idxs never suppress each other: run the greedy pass per group, in order.
  std::unordered_map<int64_t, std::vector<int64_t>> kept_by_group;
  std::vector<uint8_t> keep(static_cast<size_t>(n), 0);
  for (const int64_t i : order) {
    auto& kept = kept_by_group[idxs[i]];
    bool ok = true;
    for (const int64_t j : kept)
      if (iou_f32(boxes + 4 * j, boxes + 4 * i) > iou_threshold) {
        ok = false;
        break;
      }
    if (ok) {
      kept.push_back(i);
      keep[static_cast<size_t>(i)] = 1;
    }
  }
  std::vector<int64_t> result;
  for (const int64_t i : order)
    if (keep[static_cast<size_t>(i)]) result.push_back(i);
  return result;
}

}  // namespace cxrkit
