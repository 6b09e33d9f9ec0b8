// Antialiased linear (triangle) resize of one gray image, sparse taps: the fast version of
// cxrkit.preprocess.reference.resize_linear_aa (same weights, from resize_taps; same order: the
// vertical pass over source rows first, then the horizontal pass). Per output pixel it does
// T multiply-adds per axis instead of the reference's dense-block matmuls (~30x less work when
// downscaling 2048 -> 256). Taps outside the image clamp to the edge, as DALI does.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

template <typename T>
void resize_impl(const T* src, int64_t h, int64_t w, const int64_t* k0y, const float* wy, int64_t ty,
                 const int64_t* k0x, const float* wx, int64_t tx, int64_t nh, int64_t nw, float* out) {
  std::vector<float> row(static_cast<size_t>(w));   // one vertically filtered row (w,)
  for (int64_t i = 0; i < nh; ++i) {
    std::fill(row.begin(), row.end(), 0.0f);
    for (int64_t t = 0; t < ty; ++t) {
      const float c = wy[i * ty + t];
      if (c == 0.0f) continue;
      const int64_t y = std::min<int64_t>(h - 1, std::max<int64_t>(0, k0y[i] + t));
      const T* s = src + y * w;
      for (int64_t x = 0; x < w; ++x) row[x] += c * static_cast<float>(s[x]);
    }
    float* o = out + i * nw;
    for (int64_t j = 0; j < nw; ++j) {
      float acc = 0.0f;
      const int64_t base = k0x[j];
      for (int64_t t = 0; t < tx; ++t) {
        const int64_t x = std::min<int64_t>(w - 1, std::max<int64_t>(0, base + t));
        acc += wx[j * tx + t] * row[x];
      }
      o[j] = acc;
    }
  }
}

template <typename T>
py::array_t<float> resize_typed(py::array_t<T, py::array::c_style> img, py::array_t<int64_t, py::array::c_style> k0y,
                                py::array_t<float, py::array::c_style> wy, py::array_t<int64_t, py::array::c_style> k0x,
                                py::array_t<float, py::array::c_style> wx) {
  if (img.ndim() != 2 || wy.ndim() != 2 || wx.ndim() != 2 || k0y.ndim() != 1 || k0x.ndim() != 1)
    throw std::invalid_argument("resize_aa: img (h, w), k0 (n,), weights (n, T) expected");
  const int64_t h = img.shape(0), w = img.shape(1), nh = wy.shape(0), nw = wx.shape(0);
  if (k0y.shape(0) != nh || k0x.shape(0) != nw || h <= 0 || w <= 0)
    throw std::invalid_argument("resize_aa: tap arrays disagree with the weights or the image is empty");
  py::array_t<float> out({nh, nw});
  const T* s = img.data();
  float* o = out.mutable_data();
  const int64_t ty = wy.shape(1), tx = wx.shape(1);
  const int64_t *ky = k0y.data(), *kx = k0x.data();
  const float *py_ = wy.data(), *px = wx.data();
  {
    py::gil_scoped_release release;
    resize_impl<T>(s, h, w, ky, py_, ty, kx, px, tx, nh, nw, o);
  }
  return out;
}

}  // namespace

void bind_resize(py::module_& m) {
  m.def("resize_aa_u8", &resize_typed<uint8_t>, py::arg("img"), py::arg("k0y"), py::arg("wy"), py::arg("k0x"), py::arg("wx"));
  m.def("resize_aa_u16", &resize_typed<uint16_t>, py::arg("img"), py::arg("k0y"), py::arg("wy"), py::arg("k0x"), py::arg("wx"));
  m.def("resize_aa_f32", &resize_typed<float>, py::arg("img"), py::arg("k0y"), py::arg("wy"), py::arg("k0x"), py::arg("wx"));
}
