// pybind11 module cxrkit._C: CPU kernels of cxrkit.postprocess. Arrays arrive C-contiguous with the
// right dtype (cxrkit/kernels checks and converts); the GIL is released while the kernels run.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <limits>
#include <stdexcept>
#include <string>

#include "common.h"
#include "localize.h"

namespace py = pybind11;

namespace {

void require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument(msg);
}

bool c_contiguous(const py::array& a) {
  return (a.flags() & py::array::c_style) != 0;
}

py::tuple localize(py::array heat, py::array_t<float, py::array::c_style> t_logit, int max_peaks,
                   float region_fraction, int max_extent, float iou_threshold, int num_threads) {
  require(heat.ndim() == 4, "heatmap_logits must be (B, K, h, w), got ndim " + std::to_string(heat.ndim()));
  const py::dtype dt = heat.dtype();
  require(dt.kind() == 'f' && (dt.itemsize() == 4 || dt.itemsize() == 2),
          "heatmap_logits must be float32 or float16");
  require(c_contiguous(heat), "heatmap_logits must be C-contiguous");
  require(max_peaks >= 1 && max_peaks <= 64, "max_peaks must be in [1, 64]");
  require(max_extent >= 0 && max_extent <= 64, "max_extent must be in [0, 64]");
  cxrkit::LocalizeParams prm;
  prm.B = heat.shape(0), prm.K = heat.shape(1), prm.h = heat.shape(2), prm.w = heat.shape(3);
  require(t_logit.ndim() == 1 && t_logit.shape(0) == prm.K, "t_logit must be (K,)");
  require(prm.h * prm.w < (int64_t{1} << 31), "h * w must be < 2**31");
  prm.max_peaks = max_peaks;
  prm.max_extent = max_extent;
  prm.region_fraction = region_fraction;
  prm.iou_threshold = iou_threshold;
  const py::ssize_t B = prm.B, K = prm.K, M = max_peaks;
  py::array_t<int32_t> counts({B, K});
  py::array_t<float> scores({B, K, M});
  py::array_t<int32_t> points({B, K, M, py::ssize_t{2}});
  py::array_t<float> boxes({B, K, M, py::ssize_t{4}});
  const cxrkit::LocalizeOut out{counts.mutable_data(), scores.mutable_data(), points.mutable_data(),
                                boxes.mutable_data()};
  const bool is_half = dt.itemsize() == 2;
  const void* src = heat.data();
  const float* tl = t_logit.data();
  if (prm.h > 0 && prm.w > 0) {
    py::gil_scoped_release release;
    cxrkit::localize_cpu(src, is_half, tl, prm, out, num_threads);
  } else {  // empty maps: no peaks
    for (py::ssize_t i = 0; i < B * K; ++i) out.counts[i] = 0;
    for (py::ssize_t i = 0; i < B * K * M; ++i) {
      out.scores[i] = -1.0f;
      out.points[2 * i] = out.points[2 * i + 1] = -1;
      for (int c = 0; c < 4; ++c) out.boxes[4 * i + c] = 0.0f;
    }
  }
  return py::make_tuple(counts, scores, points, boxes);
}

py::array_t<int64_t> batched_nms(py::array_t<float, py::array::c_style> boxes,
                                 py::array_t<float, py::array::c_style> scores,
                                 py::array_t<int64_t, py::array::c_style> idxs, float iou_threshold) {
  require(boxes.ndim() == 2 && boxes.shape(1) == 4, "boxes must be (N, 4)");
  const int64_t n = boxes.shape(0);
  require(scores.ndim() == 1 && scores.shape(0) == n, "scores must be (N,)");
  require(idxs.ndim() == 1 && idxs.shape(0) == n, "idxs must be (N,)");
  std::vector<int64_t> keep;
  {
    py::gil_scoped_release release;
    keep = cxrkit::batched_nms_cpu(boxes.data(), scores.data(), idxs.data(), n, iou_threshold);
  }
  py::array_t<int64_t> result(static_cast<py::ssize_t>(keep.size()));
  std::copy(keep.begin(), keep.end(), result.mutable_data());
  return result;
}

// Test hooks: the scalar definitions, so tests can check them exhaustively against numpy.
py::array_t<float> half_to_float(py::array_t<uint16_t, py::array::c_style> h) {
  py::array_t<float> out(h.size());
  for (py::ssize_t i = 0; i < h.size(); ++i) out.mutable_data()[i] = cxrkit::half_to_float(h.data()[i]);
  return out;
}

py::array_t<float> sigmoid(py::array_t<float, py::array::c_style> z) {
  py::array_t<float> out(z.size());
  for (py::ssize_t i = 0; i < z.size(); ++i) out.mutable_data()[i] = cxrkit::sigmoid_f32(z.data()[i]);
  return out;
}

py::array_t<float> logit_floor(py::array_t<float, py::array::c_style> t) {
  py::array_t<float> out(t.size());
  for (py::ssize_t i = 0; i < t.size(); ++i) out.mutable_data()[i] = cxrkit::logit_floor(t.data()[i]);
  return out;
}

}  // namespace

void bind_resize(py::module_& m);  // resize.cpp
void bind_png(py::module_& m);  // png.cpp
void bind_normalize(py::module_& m);  // normalize.cpp
void bind_peaks(py::module_& m);  // peaks.cpp

PYBIND11_MODULE(_C, m) {
  m.doc() = "cxrkit CPU kernels (heatmap localization, batched NMS, antialiased resize, normalisation, PNG unfilter)";
  bind_resize(m);
  bind_png(m);
  bind_normalize(m);
  bind_peaks(m);
  m.def("localize", &localize, py::arg("heat"), py::arg("t_logit"), py::arg("max_peaks"),
        py::arg("region_fraction"), py::arg("max_extent"), py::arg("iou_threshold"), py::arg("num_threads") = 0,
        "(B, K, h, w) float32/float16 logits -> (counts, scores, points, boxes); see cxrkit.postprocess.detect");
  m.def("batched_nms", &batched_nms, py::arg("boxes"), py::arg("scores"), py::arg("idxs"), py::arg("iou_threshold"),
        "Greedy NMS per idxs group -> kept indices (int64), score descending, ties by index ascending");
  m.def("_half_to_float", &half_to_float);
  m.def("_sigmoid", &sigmoid);
  m.def("_logit_floor", &logit_floor);
}
