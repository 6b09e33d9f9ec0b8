// PNG row unfiltering (the five filter types of ISO/IEC 15948 section 9) for gray 8- and 16-bit
// images, after the zlib stream has been inflated in Python (cxrkit/io/png.py). Equal byte for
// byte to libpng / Pillow (tests/test_png_fast.py); 16-bit samples come out in native order.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

namespace {

// The rows of a gray image hold whole samples, so n (bytes per row) is a multiple of BPP.

// Sub (AVG false: out = in + a) and Average (AVG true: out = in + (a + b) / 2), a = out[x - BPP]
// carried in a register per byte lane, as in paeth_row below.
template <int BPP, bool AVG>
void left_row(const uint8_t* in, const uint8_t* prev, uint8_t* out, int64_t n) {
  unsigned a[BPP] = {};
  for (int64_t x = 0; x < n; x += BPP) {
    for (int k = 0; k < BPP; ++k) {
      a[k] = (in[x + k] + (AVG ? (a[k] + prev[x + k]) >> 1 : a[k])) & 0xffu;
      out[x + k] = static_cast<uint8_t>(a[k]);
    }
  }
}

// Paeth: p - a = b - c does not depend on the row being decoded, so only |a - c| and |a + b - 2c|
// sit on the serial chain out[x - BPP] -> out[x]; `a` of each byte lane stays in a register (a
// reload of out[x - BPP] through memory would add a store-forwarding delay to that chain).
template <int BPP>
void paeth_row(const uint8_t* in, const uint8_t* prev, uint8_t* out, int64_t n) {
  int a[BPP];
  for (int k = 0; k < BPP; ++k) a[k] = out[k] = static_cast<uint8_t>(in[k] + prev[k]);  // a = c = 0
  for (int64_t x = BPP; x < n; x += BPP) {
    for (int k = 0; k < BPP; ++k) {
      const int b = prev[x + k], c = prev[x + k - BPP];
      const int pa = std::abs(b - c), pb = std::abs(a[k] - c), pc = std::abs(a[k] + b - 2 * c);
      const int ab = pa <= pb ? a[k] : b;
      const int m = pa <= pb ? pa : pb;
      a[k] = (in[x + k] + (m <= pc ? ab : c)) & 0xff;
      out[x + k] = static_cast<uint8_t>(a[k]);
    }
  }
}

// One row: `in` = filtered bytes (without the filter-type byte), `prev` = the previous unfiltered
// row (zeros for row 0), `out` = this row unfiltered. Returns false for an unknown filter type.
template <int BPP>
bool unfilter_row(int type, const uint8_t* in, const uint8_t* prev, uint8_t* out, int64_t n) {
  switch (type) {
    case 0:
      std::memcpy(out, in, static_cast<size_t>(n));
      return true;
    case 1:
      left_row<BPP, false>(in, prev, out, n);
      return true;
    case 2:
      for (int64_t x = 0; x < n; ++x) out[x] = static_cast<uint8_t>(in[x] + prev[x]);
      return true;
    case 3:
      left_row<BPP, true>(in, prev, out, n);
      return true;
    case 4:
      paeth_row<BPP>(in, prev, out, n);
      return true;
    default:
      return false;
  }
}

// All rows into dst (h * rowbytes); 16-bit rows turned from big endian to native order once they
// are no longer a predictor. False at the first unknown filter type.
template <int BPP>
bool unfilter_image(const uint8_t* src, uint8_t* dst, int64_t h, int64_t rowbytes, const uint8_t* zero) {
  auto to_native = [rowbytes](uint8_t* row) {
    if (BPP != 2) return;
    auto* p = reinterpret_cast<uint16_t*>(row);
    for (int64_t x = 0; x < rowbytes / 2; ++x) p[x] = static_cast<uint16_t>((p[x] << 8) | (p[x] >> 8));
  };
  for (int64_t y = 0; y < h; ++y) {
    uint8_t* cur = dst + y * rowbytes;
    const uint8_t* row = src + y * (rowbytes + 1);
    if (!unfilter_row<BPP>(row[0], row + 1, y ? cur - rowbytes : zero, cur, rowbytes)) return false;
    if (y > 0) to_native(cur - rowbytes);
  }
  to_native(dst + (h - 1) * rowbytes);
  return true;
}

// raw: (h * (1 + w * bytes_per_sample)) inflated bytes. Returns (h, w) uint8 or uint16, or None
// when a row has an unknown filter type (the caller then lets Pillow decide).
py::object png_unfilter_gray(py::buffer raw, int64_t h, int64_t w, int bit_depth) {
  if (bit_depth != 8 && bit_depth != 16) throw std::invalid_argument("bit_depth must be 8 or 16");
  if (h <= 0 || w <= 0) throw std::invalid_argument("h and w must be positive");
  const py::buffer_info info = raw.request();
  const int64_t rowbytes = w * (bit_depth / 8);
  if (info.itemsize != 1 || info.size != h * (rowbytes + 1))
    throw std::invalid_argument("raw must hold h * (1 + w * bit_depth / 8) bytes");
  const auto* src = static_cast<const uint8_t*>(info.ptr);
  py::array out = bit_depth == 8 ? py::array(py::array_t<uint8_t>({h, w})) : py::array(py::array_t<uint16_t>({h, w}));
  auto* dst = static_cast<uint8_t*>(out.mutable_data());
  bool ok;
  {
    py::gil_scoped_release release;
    std::vector<uint8_t> zero(static_cast<size_t>(rowbytes), 0);  // the row above row 0
    ok = bit_depth == 8 ? unfilter_image<1>(src, dst, h, rowbytes, zero.data())
                        : unfilter_image<2>(src, dst, h, rowbytes, zero.data());
  }
  if (!ok) return py::none();
  return out;
}

}  // namespace

void bind_png(py::module_& m) {
  m.def("png_unfilter_gray", &png_unfilter_gray, py::arg("raw"), py::arg("h"), py::arg("w"), py::arg("bit_depth"),
        "Unfilter an inflated gray 8/16-bit PNG stream: (h, w) uint8 | uint16, or None (unknown filter type).");
}
