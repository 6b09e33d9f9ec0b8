// Heatmap logits -> peaks, regions, boxes, per-(b, k) NMS. Same function as
// cxrkit/postprocess/_reference.py::detect_reference, bit for bit.
#include "localize.h"

#include <algorithm>
#include <limits>
#include <vector>

#include "common.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace cxrkit {
namespace {

struct Peak {
  float z;
  uint32_t idx;  // raster index y * w + x
};

// Step-3 order: z descending, raster index ascending (-0.0 == +0.0 under float compare).
inline bool peak_before(const Peak& a, const Peak& b) {
  return a.z > b.z || (a.z == b.z && a.idx < b.idx);
}

void localize_map(const float* z, int64_t h, int64_t w, float t_logit, const LocalizeParams& prm,
                  int32_t* counts, float* scores, int32_t* points, float* boxes,
                  std::vector<Peak>& cands, std::vector<uint8_t>& seen, std::vector<int32_t>& stack) {
  const int M = prm.max_peaks;
  const int64_t E = prm.max_extent;
  // 1-3. candidates: z >= t_logit and >= every in-bounds 8-neighbour, in raster order. Most cells
  // of a map are below its threshold (all of them in a disabled finding's map, t_logit = +inf), so
  // blocks of 16 cells none of which reaches t_logit are skipped with a few vector compares; the
  // cells of the other blocks are tested one by one. The set of candidates is the same.
  cands.clear();
  auto test_cell = [&](int64_t i) {
    const float c = z[i];
    if (!(c >= t_logit)) return;
    const int64_t y = i / w, x = i % w;
    const int64_t ya = std::max<int64_t>(0, y - 1), yb = std::min<int64_t>(h - 1, y + 1);
    const int64_t xa = std::max<int64_t>(0, x - 1), xb = std::min<int64_t>(w - 1, x + 1);
    for (int64_t yy = ya; yy <= yb; ++yy)
      for (int64_t xx = xa; xx <= xb; ++xx)
        if (!(c >= z[yy * w + xx])) return;
    cands.push_back({c, static_cast<uint32_t>(i)});
  };
  const int64_t hw = h * w;
  int64_t i = 0;
#if defined(__SSE2__)
  const __m128 tv = _mm_set1_ps(t_logit);
  for (; i + 16 <= hw; i += 16) {
    const float* p = z + i;
    const __m128 m = _mm_or_ps(_mm_or_ps(_mm_cmpge_ps(_mm_loadu_ps(p), tv), _mm_cmpge_ps(_mm_loadu_ps(p + 4), tv)),
                               _mm_or_ps(_mm_cmpge_ps(_mm_loadu_ps(p + 8), tv), _mm_cmpge_ps(_mm_loadu_ps(p + 12), tv)));
    if (_mm_movemask_ps(m) == 0) continue;  // no cell of the block is >= t_logit (NaN never is)
    for (int64_t j = i; j < i + 16; ++j) test_cell(j);
  }
#endif
  for (; i < hw; ++i) test_cell(i);
  const size_t npk = std::min<size_t>(cands.size(), static_cast<size_t>(M));
  std::partial_sort(cands.begin(), cands.begin() + static_cast<std::ptrdiff_t>(npk), cands.end(), peak_before);

  // 4. regions: 4-connected {sigmoid(z) >= frac * P} = {z >= logit_floor(frac * P)} in the window.
  float pk_box[64][4];
  float pk_score[64];
  int32_t pk_xy[64][2];
  for (size_t i = 0; i < npk; ++i) {
    const int64_t px = cands[i].idx % w, py = cands[i].idx / w;
    const float P = sigmoid_f32(cands[i].z);
    const float zt = logit_floor(prm.region_fraction * P);
    const int64_t xa = std::max<int64_t>(0, px - E), xb = std::min<int64_t>(w - 1, px + E);
    const int64_t ya = std::max<int64_t>(0, py - E), yb = std::min<int64_t>(h - 1, py + E);
    const int64_t ww = xb - xa + 1, wh = yb - ya + 1;
    seen.assign(static_cast<size_t>(ww * wh), 0);
    stack.clear();
    int64_t x0 = px, x1 = px, y0 = py, y1 = py;
    seen[static_cast<size_t>((py - ya) * ww + (px - xa))] = 1;
    stack.push_back(static_cast<int32_t>((py - ya) * ww + (px - xa)));
    while (!stack.empty()) {
      const int32_t s = stack.back();
      stack.pop_back();
      const int64_t lx = s % ww, ly = s / ww;
      x0 = std::min(x0, xa + lx), x1 = std::max(x1, xa + lx);
      y0 = std::min(y0, ya + ly), y1 = std::max(y1, ya + ly);
      const int64_t nb[4][2] = {{lx - 1, ly}, {lx + 1, ly}, {lx, ly - 1}, {lx, ly + 1}};
      for (const auto& q : nb) {
        if (q[0] < 0 || q[0] >= ww || q[1] < 0 || q[1] >= wh) continue;
        const size_t li = static_cast<size_t>(q[1] * ww + q[0]);
        if (seen[li] || !(z[(ya + q[1]) * w + xa + q[0]] >= zt)) continue;
        seen[li] = 1;
        stack.push_back(static_cast<int32_t>(li));
      }
    }
    pk_box[i][0] = static_cast<float>(x0);
    pk_box[i][1] = static_cast<float>(y0);
    pk_box[i][2] = static_cast<float>(x1 + 1);
    pk_box[i][3] = static_cast<float>(y1 + 1);
    pk_score[i] = P;
    pk_xy[i][0] = static_cast<int32_t>(px);
    pk_xy[i][1] = static_cast<int32_t>(py);
  }

  // 5. greedy NMS in the step-3 order, kept peaks compacted to the front.
  int kept[64];
  int nkept = 0;
  for (size_t i = 0; i < npk; ++i) {
    bool keep = true;
    for (int j = 0; j < nkept && keep; ++j) keep = !(iou_f32(pk_box[kept[j]], pk_box[i]) > prm.iou_threshold);
    if (keep) kept[nkept++] = static_cast<int>(i);
  }
  *counts = nkept;
  for (int s = 0; s < M; ++s) {
    if (s < nkept) {
      const int i = kept[s];
      scores[s] = pk_score[i];
      points[2 * s] = pk_xy[i][0];
      points[2 * s + 1] = pk_xy[i][1];
      for (int c = 0; c < 4; ++c) boxes[4 * s + c] = pk_box[i][c];
    } else {
      scores[s] = -1.0f;
      points[2 * s] = points[2 * s + 1] = -1;
      for (int c = 0; c < 4; ++c) boxes[4 * s + c] = 0.0f;
    }
  }
}

}  // namespace

void localize_cpu(const void* heat, bool is_half, const float* t_logit, const LocalizeParams& prm,
                  const LocalizeOut& out, int num_threads) {
  const int64_t hw = prm.h * prm.w;
  const int M = prm.max_peaks;
  parallel_for(prm.B * prm.K, num_threads, [&](int64_t bk) {
    thread_local std::vector<float> zbuf;
    thread_local std::vector<Peak> cands;
    thread_local std::vector<uint8_t> seen;
    thread_local std::vector<int32_t> stack;
    const float* z;
    if (is_half) {
      const uint16_t* src = static_cast<const uint16_t*>(heat) + bk * hw;
      zbuf.resize(static_cast<size_t>(hw));
      for (int64_t i = 0; i < hw; ++i) zbuf[static_cast<size_t>(i)] = half_to_float(src[i]);
      z = zbuf.data();
    } else {
      z = static_cast<const float*>(heat) + bk * hw;
    }
    localize_map(z, prm.h, prm.w, t_logit[bk % prm.K], prm, out.counts + bk, out.scores + bk * M,
                 out.points + bk * M * 2, out.boxes + bk * M * 4, cands, seen, stack);
  });
}

}  // namespace cxrkit
