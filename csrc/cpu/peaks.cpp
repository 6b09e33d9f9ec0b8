// The localize stage's gather: the reported peaks of a batch, from the kernel's fixed (B, K, M) slots
// to flat columns in (image, finding, peak) order, mapped back to source pixels through each image's
// letterbox transform. The fast version of cxrkit/_stages/localize.py::Localizer._kept_numpy (numpy,
// ~20 small calls: at batch 1 they cost ~30 µs, this ~2), bit for bit: the same float64 steps per
// coordinate, then one rounding to float32:
//   x = double(cell) * stride            (box corners; points: (double(cell) + 0.5) * stride)
//   x = (x - left) / scale_x;  x = min(max(x, 0), width)          (y: top, scale_y, height)
// Coordinates are finite and x - left is never -0.0 (cells >= 0, offsets integers), so the clip's
// comparisons have no NaN or signed-zero case where numpy's clip and these could differ.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace {

inline float to_source(double v, double offset, double scale, double extent) {
  double s = (v - offset) / scale;
  s = s > 0.0 ? s : 0.0;
  s = s < extent ? s : extent;
  return static_cast<float>(s);
}

py::tuple gather_peaks(py::array_t<int32_t, py::array::c_style> shown, py::array_t<float, py::array::c_style> scores,
                       py::array_t<int32_t, py::array::c_style> points, py::array_t<float, py::array::c_style> boxes,
                       py::array_t<double, py::array::c_style> geometry, double stride) {
  if (shown.ndim() != 2 || scores.ndim() != 3 || points.ndim() != 4 || boxes.ndim() != 4 || geometry.ndim() != 2)
    throw std::invalid_argument("gather_peaks: shown (B, K), scores (B, K, M), points (B, K, M, 2), boxes (B, K, M, 4), "
                                "geometry (B, 6) expected");
  const int64_t B = shown.shape(0), K = shown.shape(1), M = scores.shape(2);
  if (scores.shape(0) != B || scores.shape(1) != K || points.shape(0) != B || points.shape(1) != K ||
      points.shape(2) != M || points.shape(3) != 2 || boxes.shape(0) != B || boxes.shape(1) != K ||
      boxes.shape(2) != M || boxes.shape(3) != 4 || geometry.shape(0) != B || geometry.shape(1) != 6)
    throw std::invalid_argument("gather_peaks: inconsistent shapes");
  const int32_t* sh = shown.data();
  py::array_t<int64_t> offsets(B * K + 1);
  int64_t* off = offsets.mutable_data();
  off[0] = 0;
  for (int64_t j = 0; j < B * K; ++j) {
    if (sh[j] < 0 || sh[j] > M)
      throw std::invalid_argument("gather_peaks: shown[" + std::to_string(j) + "] = " + std::to_string(sh[j]) +
                                  " is outside [0, M=" + std::to_string(M) + "]");
    off[j + 1] = off[j] + sh[j];
  }
  const int64_t n = off[B * K];
  py::array_t<float> out_boxes({static_cast<py::ssize_t>(n), py::ssize_t{4}});
  py::array_t<float> out_points({static_cast<py::ssize_t>(n), py::ssize_t{2}});
  py::array_t<float> out_scores(static_cast<py::ssize_t>(n));
  float* ob = out_boxes.mutable_data();
  float* op = out_points.mutable_data();
  float* os = out_scores.mutable_data();
  const float* sc = scores.data();
  const int32_t* pt = points.data();
  const float* bx = boxes.data();
  const double* geo = geometry.data();
  int64_t i = 0;
  for (int64_t b = 0; b < B; ++b) {
    const double* g = geo + b * 6;  // left, top, scale x, scale y, width, height
    for (int64_t k = 0; k < K; ++k) {
      const int64_t bk = b * K + k;
      for (int64_t s = 0; s < sh[bk]; ++s, ++i) {
        const int64_t slot = bk * M + s;
        for (int c = 0; c < 2; ++c) {
          ob[4 * i + 2 * c] = to_source(static_cast<double>(bx[4 * slot + 2 * c]) * stride, g[0], g[2], g[4]);
          ob[4 * i + 2 * c + 1] = to_source(static_cast<double>(bx[4 * slot + 2 * c + 1]) * stride, g[1], g[3], g[5]);
        }
        op[2 * i] = to_source((static_cast<double>(pt[2 * slot]) + 0.5) * stride, g[0], g[2], g[4]);
        op[2 * i + 1] = to_source((static_cast<double>(pt[2 * slot + 1]) + 0.5) * stride, g[1], g[3], g[5]);
        os[i] = sc[slot];
      }
    }
  }
  return py::make_tuple(offsets, out_boxes, out_points, out_scores);
}

}  // namespace

void bind_peaks(py::module_& m) {
  m.def("gather_peaks", &gather_peaks, py::arg("shown"), py::arg("scores"), py::arg("points"), py::arg("boxes"),
        py::arg("geometry"), py::arg("stride"),
        "(offsets (B*K+1,) int64, boxes (n, 4), points (n, 2), scores (n,) float32 in source pixels) of the first "
        "shown[b, k] peaks of each (b, k); see cxrkit/_stages/localize.py");
}
