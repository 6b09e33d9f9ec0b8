// cxrkit heatmap localization on the GPU: logits (B, K, h, w) -> peaks, regions, boxes, NMS.
// Same function as cxrkit/postprocess/_reference.py::detect_reference, bit for bit.
//
// One thread block (256 threads, 8 warps) per (b, k) map, no host sync, Detections written directly:
//  1. scan: each warp walks 30-column strips of 16 rows; a lane holds one column in registers and
//     gets its left/right neighbours by shuffles, so each cell is loaded ~1.2 times. A candidate is
//     z >= t_logit and >= its in-bounds 8 neighbours; its 64-bit key (ordered(z) << 32 | ~index)
//     orders z descending, raster index ascending, and is appended to a shared list of CXR_CAP.
//  2. overflow (more than CXR_CAP candidates, e.g. plateaus or noise): sort the CXR_CAP captured
//     keys, take the M-th largest as a key floor and rescan keeping keys >= floor. The true top M
//     all lie above the floor, each pass raises it strictly, and a pass keeps at most
//     (candidates - CXR_CAP + M) keys, so it ends in at most ceil(n / (CXR_CAP - M)) passes; the
//     common case is one pass.
//  3. bitonic sort of the list, keep the first M.
//  4. one warp per peak: P = sigmoid(z); the region test sigmoid(z') >= frac * P becomes
//     z' >= z_t with z_t the smallest float passing it (32-ary search, sigmoid is monotone), so the
//     region needs no per-cell exp. The window's allowed mask is built with ballots into registers
//     (lane l owns rows l*rpl..), then rounds of [full horizontal run fill with carry tricks, full
//     vertical fill with a warp scan of (allowed, seed) pairs down and up] until nothing changes.
//     Box = bounding box of the region (edge units).
//  5. bitmask NMS over the <= 64 boxes in shared memory, compaction, defaults for empty slots.
//
// NaN logits: a NaN cell is never a candidate nor part of a region, and a cell with a NaN 8-neighbour
// is not a candidate (every comparison with NaN is false), as in the reference and the C++ kernel.
//
// GPUs: sm_80+ use __reduce_*_sync; sm_70 / sm_75 get a shuffle fallback (common.cuh).
// Compile check: nvcc -c -arch=sm_90 --std=c++17 -o /dev/null csrc/cuda/localize.cu
// At run time cxrkit/kernels/_cuda.py compiles it with CuPy RawModule (NVRTC), cached per arch.
#include "common.cuh"

#define CXR_LOC_THREADS 256
#define CXR_LOC_WARPS (CXR_LOC_THREADS / 32)
#define CXR_CAP 1024
#define CXR_MAXM 64
#define CXR_SCAN_ROWS 16
#define CXR_STRIP 30

__device__ __forceinline__ float cxr_load(const float* p, long long i) { return __ldg(p + i); }

__device__ __forceinline__ float cxr_load(const __half* p, long long i) {
  return __half2float(__ushort_as_half(__ldg(reinterpret_cast<const unsigned short*>(p) + i)));
}

__device__ __forceinline__ float cxr_load(const cxr_bf16* p, long long i) {
  return __uint_as_float((unsigned int)__ldg(reinterpret_cast<const unsigned short*>(p) + i) << 16);
}

// Steps 1-2: append keys >= key_min of the candidate cells to cand (count may exceed CXR_CAP).
template <typename T>
__device__ __forceinline__ void cxr_scan(const T* __restrict__ map, int h, int w, float thr,
                                         cxr_u64 key_min, cxr_u64* cand, unsigned int* count,
                                         int warp, int lane) {
  const float ninf = -cxr_inf();  // out-of-bounds neighbours never win
  const int nstrips = (w + CXR_STRIP - 1) / CXR_STRIP;
  const int nitems = nstrips * ((h + CXR_SCAN_ROWS - 1) / CXR_SCAN_ROWS);
  for (int item = warp; item < nitems; item += CXR_LOC_WARPS) {
    const int y0 = (item / nstrips) * CXR_SCAN_ROWS;
    const int x = (item % nstrips) * CXR_STRIP - 1 + lane;  // lanes 0 and 31 are halo columns
    const bool xin = x >= 0 && x < w;
    float v[CXR_SCAN_ROWS + 2];
#pragma unroll
    for (int r = 0; r < CXR_SCAN_ROWS + 2; ++r) {
      const int y = y0 - 1 + r;
      v[r] = (xin && y >= 0 && y < h) ? cxr_load(map, (long long)y * w + x) : ninf;
    }
    float lu = __shfl_up_sync(CXR_FULL_MASK, v[0], 1), ru = __shfl_down_sync(CXR_FULL_MASK, v[0], 1);
    float lc = __shfl_up_sync(CXR_FULL_MASK, v[1], 1), rc = __shfl_down_sync(CXR_FULL_MASK, v[1], 1);
    const bool lane_out = xin && lane >= 1 && lane <= CXR_STRIP;
#pragma unroll
    for (int r = 1; r <= CXR_SCAN_ROWS; ++r) {
      const float ld = __shfl_up_sync(CXR_FULL_MASK, v[r + 1], 1);
      const float rd = __shfl_down_sync(CXR_FULL_MASK, v[r + 1], 1);
      const float c = v[r];
      const int y = y0 + r - 1;
      if (lane_out && y < h && c >= thr && c >= v[r - 1] && c >= lu && c >= ru && c >= lc && c >= rc &&
          c >= v[r + 1] && c >= ld && c >= rd) {
        const float cz = (c == 0.0f) ? 0.0f : c;  // -0.0 ties with +0.0
        const unsigned int idx = (unsigned int)y * (unsigned int)w + (unsigned int)x;
        const cxr_u64 key = ((cxr_u64)cxr_float_to_ordered(cz) << 32) | (cxr_u64)(0xffffffffu - idx);
        if (key >= key_min) {
          const unsigned int pos = atomicAdd(count, 1u);
          if (pos < CXR_CAP) cand[pos] = key;
        }
      }
      lu = lc;
      ru = rc;
      lc = ld;
      rc = rd;
    }
  }
}

// Block-wide bitonic sort, descending, of a[0..n2) (n2 a power of two). Ends synchronized.
__device__ __forceinline__ void cxr_sort_desc(cxr_u64* a, int n2) {
  for (int k = 2; k <= n2; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int i = threadIdx.x; i < n2; i += blockDim.x) {
        const int ixj = i ^ j;
        if (ixj > i) {
          const cxr_u64 ai = a[i], aj = a[ixj];
          if (((i & k) == 0) ? (ai < aj) : (ai > aj)) {
            a[i] = aj;
            a[ixj] = ai;
          }
        }
      }
      __syncthreads();
    }
  }
}

// Smallest non-NaN float z with cxr_sigmoid(z) >= t (t <= 1), by a 32-ary search over the ordered
// float space (the whole warp calls it with the same t).
__device__ __forceinline__ float cxr_logit_floor(float t, int lane) {
  unsigned int lo = cxr_float_to_ordered(-cxr_inf());
  unsigned int hi = cxr_float_to_ordered(cxr_inf());  // sigmoid(+inf) = 1 >= t
  while (lo < hi) {
    const unsigned int q = lo + (unsigned int)(((cxr_u64)(hi - lo) * (cxr_u64)(lane + 1)) >> 5);  // lane 31: hi
    const unsigned int ok = __ballot_sync(CXR_FULL_MASK, cxr_sigmoid(cxr_ordered_to_float(q)) >= t);
    const int f = __ffs(ok) - 1;
    const unsigned int qf = __shfl_sync(CXR_FULL_MASK, q, f);
    const unsigned int qp = __shfl_sync(CXR_FULL_MASK, q, f > 0 ? f - 1 : 0);
    hi = qf;
    lo = (f == 0) ? lo : qp + 1u;
  }
  return cxr_ordered_to_float(lo);
}

// Within a 32-bit word: the runs of allowed bits a that hold a seed bit of s.
__device__ __forceinline__ unsigned int cxr_fill_up(unsigned int a, unsigned int s) {
  return (((a + s) ^ a) | s) & a;  // carry runs from the lowest seed of each run to its top
}

__device__ __forceinline__ unsigned int cxr_fill_word(unsigned int a, unsigned int s) {
  s &= a;
  return cxr_fill_up(a, s) | __brev(cxr_fill_up(__brev(a), __brev(s)));
}

// Full horizontal fill of one window row of nw words (bit j of word c is column 32 c + j).
template <int NW>
__device__ __forceinline__ void cxr_fill_row(const unsigned int (&a)[NW], unsigned int (&r)[NW], int nw) {
  unsigned int carry = 0u;
#pragma unroll
  for (int c = 0; c < NW; ++c) {
    if (c < nw) {
      r[c] = cxr_fill_word(a[c], r[c] | carry);
      carry = r[c] >> 31;
    }
  }
  carry = 0u;
#pragma unroll
  for (int c = NW - 1; c >= 0; --c) {
    if (c < nw) {
      r[c] = cxr_fill_word(a[c], r[c] | (carry << 31));
      carry = r[c] & 1u;
    }
  }
}

// Step 4 for one peak, by one warp: bounding box (x0, y0, x1, y1), edge units, valid on every lane.
template <typename T, int NW>
__device__ __forceinline__ void cxr_region_box(const T* __restrict__ map, int h, int w, int px, int py,
                                               int E, float zt, int lane, int* box) {
  const int xa = max(0, px - E), xb = min(w - 1, px + E);
  const int ya = max(0, py - E), yb = min(h - 1, py + E);
  const int wc = xb - xa + 1, wr = yb - ya + 1;  // <= 2E + 1 <= 32 NW
  const int nw = (wc + 31) >> 5;
  const int rpl = (wr + 31) >> 5;  // window rows per lane; lane l owns rows l * rpl + i
  unsigned int A[NW][NW], R[NW][NW];
#pragma unroll
  for (int i = 0; i < NW; ++i) {
#pragma unroll
    for (int c = 0; c < NW; ++c) {
      A[i][c] = 0u;
      R[i][c] = 0u;
    }
  }
  // Allowed mask {z >= zt}: a warp-wide coalesced load + ballot per (row, word); two owner lanes
  // per step so up to 2 NW^2 independent loads are in flight.
#pragma unroll 2
  for (int l = 0; l < 32; ++l) {
#pragma unroll
    for (int i = 0; i < NW; ++i) {
      const int r = l * rpl + i;
      if (i < rpl && r < wr) {
        const long long row = (long long)(ya + r) * w + xa;
#pragma unroll
        for (int c = 0; c < NW; ++c) {
          if (c < nw) {
            const int col = c * 32 + lane;
            const bool ok = col < wc && cxr_load(map, row + col) >= zt;
            const unsigned int bits = __ballot_sync(CXR_FULL_MASK, ok);
            if (lane == l) A[i][c] = bits;
          }
        }
      }
    }
  }
  // Seed: the peak cell (always allowed: frac * P <= P).
  const int pr = py - ya, pc = px - xa;
#pragma unroll
  for (int i = 0; i < NW; ++i) {
#pragma unroll
    for (int c = 0; c < NW; ++c) {
      const bool here = i < rpl && lane * rpl + i == pr && c == (pc >> 5);
      R[i][c] = A[i][c] & (here ? (1u << (pc & 31)) : 0u);  // a select, so R stays in registers
    }
  }
  // Grow to the fixed point of 4-neighbour propagation inside A.
  bool changed = true;
  while (__any_sync(CXR_FULL_MASK, changed)) {
    changed = false;
#pragma unroll
    for (int i = 0; i < NW; ++i) {
      if (i < rpl) {
        unsigned int after = 0u;
        unsigned int old[NW];
#pragma unroll
        for (int c = 0; c < NW; ++c) old[c] = R[i][c];
        cxr_fill_row<NW>(A[i], R[i], nw);
#pragma unroll
        for (int c = 0; c < NW; ++c) after |= R[i][c] ^ old[c];
        changed |= (after != 0u);
      }
    }
#pragma unroll
    for (int c = 0; c < NW; ++c) {
      if (c < nw) {
        // Downward: out[r] = R[r] | (A[r] & out[r - 1]); scan of pairs (a, s), later o earlier =
        // (a_e & a_l, s_l | (a_l & s_e)).
        unsigned int ag = 0xffffffffu, sg = 0u;
#pragma unroll
        for (int i = 0; i < NW; ++i) {
          if (i < rpl) {
            sg = R[i][c] | (A[i][c] & sg);
            ag &= A[i][c];
          }
        }
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
          const unsigned int ap = __shfl_up_sync(CXR_FULL_MASK, ag, d);
          const unsigned int sp = __shfl_up_sync(CXR_FULL_MASK, sg, d);
          if (lane >= d) {
            sg |= ag & sp;
            ag &= ap;
          }
        }
        unsigned int in = __shfl_up_sync(CXR_FULL_MASK, sg, 1);
        if (lane == 0) in = 0u;
#pragma unroll
        for (int i = 0; i < NW; ++i) {
          if (i < rpl) {
            const unsigned int nv = R[i][c] | (A[i][c] & in);
            changed |= (nv != R[i][c]);
            R[i][c] = nv;
            in = nv;
          }
        }
        // Upward: the same from the bottom row.
        ag = 0xffffffffu;
        sg = 0u;
#pragma unroll
        for (int i = NW - 1; i >= 0; --i) {
          if (i < rpl) {
            sg = R[i][c] | (A[i][c] & sg);
            ag &= A[i][c];
          }
        }
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
          const unsigned int ap = __shfl_down_sync(CXR_FULL_MASK, ag, d);
          const unsigned int sp = __shfl_down_sync(CXR_FULL_MASK, sg, d);
          if (lane + d < 32) {
            sg |= ag & sp;
            ag &= ap;
          }
        }
        in = __shfl_down_sync(CXR_FULL_MASK, sg, 1);
        if (lane == 31) in = 0u;
#pragma unroll
        for (int i = NW - 1; i >= 0; --i) {
          if (i < rpl) {
            const unsigned int nv = R[i][c] | (A[i][c] & in);
            changed |= (nv != R[i][c]);
            R[i][c] = nv;
            in = nv;
          }
        }
      }
    }
  }
  // Bounding box of R.
  int rmin = 0x7fffffff, rmax = -1;
  unsigned int cor[NW];
#pragma unroll
  for (int c = 0; c < NW; ++c) cor[c] = 0u;
#pragma unroll
  for (int i = 0; i < NW; ++i) {
    if (i < rpl) {
      unsigned int any = 0u;
#pragma unroll
      for (int c = 0; c < NW; ++c) {
        any |= R[i][c];
        cor[c] |= R[i][c];
      }
      if (any) {
        rmin = min(rmin, lane * rpl + i);
        rmax = max(rmax, lane * rpl + i);
      }
    }
  }
  rmin = cxr_warp_min(rmin);
  rmax = cxr_warp_max(rmax);
  int cmin = 0x7fffffff, cmax = -1;
#pragma unroll
  for (int c = 0; c < NW; ++c) {
    const unsigned int o = cxr_warp_or(cor[c]);
    if (o != 0u) {
      cmin = min(cmin, c * 32 + __ffs(o) - 1);
      cmax = max(cmax, c * 32 + 31 - __clz(o));
    }
  }
  box[0] = xa + cmin;
  box[1] = ya + rmin;
  box[2] = xa + cmax + 1;
  box[3] = ya + rmax + 1;
}

struct CxrLocShared {
  cxr_u64 cand[CXR_CAP];
  cxr_u64 nms_mask[CXR_MAXM];
  float box[CXR_MAXM][4];
  float score[CXR_MAXM];
  int pt[CXR_MAXM][2];
  cxr_u64 keep;
  unsigned int count;
};

template <typename T, int NW>
__device__ __forceinline__ void cxr_localize_body(const T* __restrict__ heat, const float* __restrict__ t_logit,
                                                  int K, int h, int w, int M, int E, float frac, float iou_t,
                                                  int* __restrict__ counts, float* __restrict__ scores,
                                                  int* __restrict__ points, float* __restrict__ boxes) {
  __shared__ CxrLocShared sm;
  const int bk = blockIdx.x;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const T* map = heat + (long long)bk * h * w;
  const float thr = t_logit[bk % K];

  // Steps 1-2: candidates, with the key-floor rescan on overflow.
  cxr_u64 key_min = 0ull;
  unsigned int n;
  for (;;) {
    if (tid == 0) sm.count = 0u;
    __syncthreads();
    cxr_scan<T>(map, h, w, thr, key_min, sm.cand, &sm.count, warp, lane);
    __syncthreads();
    n = sm.count;
    if (n <= CXR_CAP) break;
    cxr_sort_desc(sm.cand, CXR_CAP);
    key_min = sm.cand[M - 1];
    __syncthreads();  // all have read the floor before the next pass overwrites cand
  }
  // Step 3: sort, keep the first M.
  int n2 = 1;
  while (n2 < (int)n) n2 <<= 1;
  for (int i = (int)n + tid; i < n2; i += blockDim.x) sm.cand[i] = 0ull;
  __syncthreads();
  cxr_sort_desc(sm.cand, n2);
  const int npk = min((int)n, M);

  // Step 4: one warp per peak.
  for (int i = warp; i < npk; i += CXR_LOC_WARPS) {
    const cxr_u64 key = sm.cand[i];
    const float z = cxr_ordered_to_float((unsigned int)(key >> 32));
    const unsigned int idx = 0xffffffffu - (unsigned int)(key & 0xffffffffull);
    const int py = (int)(idx / (unsigned int)w), px = (int)(idx % (unsigned int)w);
    const float P = cxr_sigmoid(z);
    const float zt = cxr_logit_floor(__fmul_rn(frac, P), lane);
    int b[4];
    cxr_region_box<T, NW>(map, h, w, px, py, E, zt, lane, b);
    if (lane == 0) {
      sm.box[i][0] = (float)b[0];
      sm.box[i][1] = (float)b[1];
      sm.box[i][2] = (float)b[2];
      sm.box[i][3] = (float)b[3];
      sm.score[i] = P;
      sm.pt[i][0] = px;
      sm.pt[i][1] = py;
    }
  }
  __syncthreads();

  // Step 5: bitmask NMS in the step-3 order.
  for (int i = tid; i < npk; i += blockDim.x) {
    cxr_u64 m = 0ull;
    for (int j = i + 1; j < npk; ++j) {
      if (cxr_iou(sm.box[i][0], sm.box[i][1], sm.box[i][2], sm.box[i][3], sm.box[j][0], sm.box[j][1],
                  sm.box[j][2], sm.box[j][3]) > iou_t)
        m |= 1ull << j;
    }
    sm.nms_mask[i] = m;
  }
  __syncthreads();
  if (tid == 0) {
    cxr_u64 removed = 0ull, keep = 0ull;
    for (int i = 0; i < npk; ++i) {
      if (!((removed >> i) & 1ull)) {
        keep |= 1ull << i;
        removed |= sm.nms_mask[i];
      }
    }
    sm.keep = keep;
    counts[bk] = __popcll(keep);
  }
  __syncthreads();
  const cxr_u64 keep = sm.keep;
  const int nkept = __popcll(keep);
  const long long o = (long long)bk * M;
  for (int i = tid; i < npk; i += blockDim.x) {
    if ((keep >> i) & 1ull) {
      const long long s = o + __popcll(keep & ((1ull << i) - 1ull));
      scores[s] = sm.score[i];
      points[2 * s] = sm.pt[i][0];
      points[2 * s + 1] = sm.pt[i][1];
      boxes[4 * s] = sm.box[i][0];
      boxes[4 * s + 1] = sm.box[i][1];
      boxes[4 * s + 2] = sm.box[i][2];
      boxes[4 * s + 3] = sm.box[i][3];
    }
  }
  for (int j = nkept + tid; j < M; j += blockDim.x) {
    const long long s = o + j;
    scores[s] = -1.0f;
    points[2 * s] = -1;
    points[2 * s + 1] = -1;
    boxes[4 * s] = 0.0f;
    boxes[4 * s + 1] = 0.0f;
    boxes[4 * s + 2] = 0.0f;
    boxes[4 * s + 3] = 0.0f;
  }
}

// Entry points: <dtype>_w<NW>, NW = words per window row = ceil((2 E + 1) / 32) rounded up to 1, 2, 3, 5.
// Launch: grid (B * K), block (256); t_logit (K,) float32; outputs as in cxrkit.postprocess.Detections.
#define CXR_LOCALIZE_ENTRY(NAME, T, NW, MINB)                                                        \
  extern "C" __global__ void __launch_bounds__(CXR_LOC_THREADS, MINB)                                \
      NAME(const T* __restrict__ heat, const float* __restrict__ t_logit, int K, int h, int w, int M, \
           int E, float frac, float iou_t, int* __restrict__ counts, float* __restrict__ scores,     \
           int* __restrict__ points, float* __restrict__ boxes) {                                    \
    cxr_localize_body<T, NW>(heat, t_logit, K, h, w, M, E, frac, iou_t, counts, scores, points, boxes); \
  }

CXR_LOCALIZE_ENTRY(cxr_localize_f32_w1, float, 1, 4)
CXR_LOCALIZE_ENTRY(cxr_localize_f32_w2, float, 2, 4)
CXR_LOCALIZE_ENTRY(cxr_localize_f32_w3, float, 3, 4)
CXR_LOCALIZE_ENTRY(cxr_localize_f32_w5, float, 5, 2)
CXR_LOCALIZE_ENTRY(cxr_localize_f16_w1, __half, 1, 4)
CXR_LOCALIZE_ENTRY(cxr_localize_f16_w2, __half, 2, 4)
CXR_LOCALIZE_ENTRY(cxr_localize_f16_w3, __half, 3, 4)
CXR_LOCALIZE_ENTRY(cxr_localize_f16_w5, __half, 5, 2)
CXR_LOCALIZE_ENTRY(cxr_localize_bf16_w1, cxr_bf16, 1, 4)
CXR_LOCALIZE_ENTRY(cxr_localize_bf16_w2, cxr_bf16, 2, 4)
CXR_LOCALIZE_ENTRY(cxr_localize_bf16_w3, cxr_bf16, 3, 4)
CXR_LOCALIZE_ENTRY(cxr_localize_bf16_w5, cxr_bf16, 5, 2)
