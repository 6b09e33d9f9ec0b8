// Unit range and model normalisation of a gray uint8 / uint16 image that needs no resize, in one
// pass: the fast version of cxrkit.preprocess.reference._normalize_in_place, bit for bit. Per pixel,
// each step rounded to float32 as numpy does it (build with -ffp-contract=off):
//   o = float(x);  o = o - lo;  o = o / range;  o = o - mean;  o = o / std
// A division by a power of two is done as a multiplication by its (exact) inverse, which gives the
// same bits (both round the same exact quotient once), as the numpy version does. Integers below
// 2^24 convert to float exactly. numpy makes five passes over a (H, W) float32 buffer; this makes
// one, vectorised (SSE2 everywhere, AVX2 where the CPU has it).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace py = pybind11;

namespace {

struct Affine {
  float lo, range, mean, std_;
  bool range_pow2, std_pow2;  // divide as a multiplication by the inverse (exact, same bits)
  float inv_range, inv_std;
};

#define CXRKIT_NORMALIZE_BODY                                                                  \
  template <typename T, bool R2, bool S2>                                                      \
  void run(const T* __restrict src, float* __restrict out, int64_t n, const Affine& a) {       \
    const float lo = a.lo, range = a.range, mean = a.mean, sd = a.std_;                        \
    const float ir = a.inv_range, is = a.inv_std;                                              \
    for (int64_t i = 0; i < n; ++i) {                                                          \
      float o = static_cast<float>(src[i]);                                                    \
      o = o - lo;                                                                              \
      o = R2 ? o * ir : o / range;                                                             \
      o = o - mean;                                                                            \
      o = S2 ? o * is : o / sd;                                                                \
      out[i] = o;                                                                              \
    }                                                                                          \
  }                                                                                            \
  template <typename T>                                                                        \
  void dispatch(const T* src, float* out, int64_t n, const Affine& a) {                        \
    if (a.range_pow2) {                                                                        \
      if (a.std_pow2) run<T, true, true>(src, out, n, a); else run<T, true, false>(src, out, n, a); \
    } else {                                                                                   \
      if (a.std_pow2) run<T, false, true>(src, out, n, a); else run<T, false, false>(src, out, n, a); \
    }                                                                                          \
  }

namespace base {
CXRKIT_NORMALIZE_BODY
}  // namespace base

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define CXRKIT_HAVE_AVX2_CLONE 1
#pragma GCC push_options
#pragma GCC target("avx2")
namespace avx2 {
CXRKIT_NORMALIZE_BODY
}  // namespace avx2
#pragma GCC pop_options
#endif

bool is_pow2(float d) {
  int e = 0;
  const float m = std::frexp(d, &e);
  return std::fabs(m) == 0.5f;
}

template <typename T>
void normalize(const T* src, float* out, int64_t n, const Affine& a) {
#ifdef CXRKIT_HAVE_AVX2_CLONE
  static const bool has_avx2 = __builtin_cpu_supports("avx2");
  if (has_avx2) return avx2::dispatch<T>(src, out, n, a);
#endif
  base::dispatch<T>(src, out, n, a);
}

template <typename T>
void normalize_typed(py::array_t<T, py::array::c_style> img, float lo, float range, float mean, float std_,
                     py::array out) {
  if (img.ndim() != 2) throw std::invalid_argument("normalize: img must be (h, w)");
  const int64_t n = img.shape(0) * img.shape(1);
  if (!(out.dtype().kind() == 'f' && out.dtype().itemsize() == 4) || !(out.flags() & py::array::c_style) ||
      !out.writeable() || out.size() != n)
    throw std::invalid_argument("normalize: out must be a writeable C-contiguous float32 array of " +
                                std::to_string(n) + " elements");
  Affine a{lo, range, mean, std_, is_pow2(range), is_pow2(std_), 1.0f / range, 1.0f / std_};
  const T* s = img.data();
  float* o = static_cast<float*>(out.mutable_data());
  py::gil_scoped_release release;
  normalize<T>(s, o, n, a);
}

}  // namespace

void bind_normalize(py::module_& m) {
  m.def("normalize_u8", &normalize_typed<uint8_t>, py::arg("img"), py::arg("lo"), py::arg("range"), py::arg("mean"),
        py::arg("std"), py::arg("out"),
        "(h, w) uint8 -> out (h*w float32): (((x - lo) / range) - mean) / std, each step rounded to float32");
  m.def("normalize_u16", &normalize_typed<uint16_t>, py::arg("img"), py::arg("lo"), py::arg("range"), py::arg("mean"),
        py::arg("std"), py::arg("out"),
        "(h, w) uint16 -> out (h*w float32): (((x - lo) / range) - mean) / std, each step rounded to float32");
}
