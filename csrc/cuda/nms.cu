// Batched greedy NMS on the GPU (torchvision semantics, boxes of different idxs never suppress each
// other). Same function as cxrkit/postprocess/_reference.py::batched_nms_reference.
//
//  1. cxr_nms_keys: 64-bit key per box, (~ordered(score) << 32 | index), stored with the top bit
//     flipped so a signed int64 sort (torch / CuPy) orders it as unsigned: score descending,
//     index ascending, NaN scores after all others (index ascending among them). Keys are unique,
//     so any sort gives the same order.
//  2. cxr_nms_gather: boxes and idxs in that order.
//  3. cxr_nms_mask: 64 x 64 tiles, bit j of mask[i][cb] = box 64 cb + j comes after i, has the same
//     idx and IoU(i, j) > threshold (as torchvision's nms kernel, plus the idx test).
//  4. cxr_nms_reduce: one block walks the 64-box column blocks in order: one thread resolves a
//     block from its 64 diagonal words (in shared memory), then all threads OR the kept rows into
//     the removed bits of the later blocks (independent loads, shared atomics).
//
// Compile check: nvcc -c -arch=sm_90 --std=c++17 -o /dev/null csrc/cuda/nms.cu
#include "common.cuh"

#define CXR_NMS_TILE 64

extern "C" __global__ void cxr_nms_keys(const float* __restrict__ scores, int n, long long* __restrict__ keys) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  float s = scores[i];
  if (s == 0.0f) s = 0.0f;  // -0.0 ties with +0.0
  // NaN (any sign or payload) ranks after every number, -inf included: ordered value 0
  const unsigned int o = (s != s) ? 0u : cxr_float_to_ordered(s);
  const cxr_u64 k = ((cxr_u64)(~o) << 32) | (cxr_u64)(unsigned int)i;
  keys[i] = (long long)(k ^ 0x8000000000000000ull);
}

extern "C" __global__ void cxr_nms_gather(const long long* __restrict__ keys, const float* __restrict__ boxes,
                                          const long long* __restrict__ idxs, int n, float* __restrict__ sboxes,
                                          long long* __restrict__ sidxs, long long* __restrict__ order) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const long long src = (long long)((cxr_u64)keys[i] & 0xffffffffull);
  order[i] = src;
  sidxs[i] = idxs[src];
#pragma unroll
  for (int c = 0; c < 4; ++c) sboxes[4 * i + c] = boxes[4 * src + c];
}

// Grid (col_blocks, col_blocks), block 64.
extern "C" __global__ void __launch_bounds__(CXR_NMS_TILE)
    cxr_nms_mask(const float* __restrict__ sboxes, const long long* __restrict__ sidxs, int n, int col_blocks,
                 float iou_t, cxr_u64* __restrict__ mask) {
  const int row_block = blockIdx.y, col_block = blockIdx.x;
  if (col_block < row_block) return;  // never read
  const int row_size = min(n - row_block * CXR_NMS_TILE, CXR_NMS_TILE);
  const int col_size = min(n - col_block * CXR_NMS_TILE, CXR_NMS_TILE);
  __shared__ float cb[CXR_NMS_TILE][4];
  __shared__ long long ci[CXR_NMS_TILE];
  const int t = threadIdx.x;
  if (t < col_size) {
    const int j = col_block * CXR_NMS_TILE + t;
#pragma unroll
    for (int c = 0; c < 4; ++c) cb[t][c] = sboxes[4 * j + c];
    ci[t] = sidxs[j];
  }
  __syncthreads();
  if (t < row_size) {
    const int i = row_block * CXR_NMS_TILE + t;
    const float x0 = sboxes[4 * i], y0 = sboxes[4 * i + 1], x1 = sboxes[4 * i + 2], y1 = sboxes[4 * i + 3];
    const long long gi = sidxs[i];
    cxr_u64 m = 0ull;
    for (int j = (row_block == col_block) ? t + 1 : 0; j < col_size; ++j) {
      if (ci[j] == gi && cxr_iou(x0, y0, x1, y1, cb[j][0], cb[j][1], cb[j][2], cb[j][3]) > iou_t) m |= 1ull << j;
    }
    mask[(long long)i * col_blocks + col_block] = m;
  }
}

// Grid 1, block 1024, dynamic shared memory col_blocks * 8 bytes. keep[i] = 1 iff sorted box i is kept.
extern "C" __global__ void __launch_bounds__(1024)
    cxr_nms_reduce(const cxr_u64* __restrict__ mask, int n, int col_blocks, unsigned char* __restrict__ keep) {
  extern __shared__ cxr_u64 removed[];
  __shared__ cxr_u64 diag[CXR_NMS_TILE];
  __shared__ int kept_list[CXR_NMS_TILE];
  __shared__ int n_kept;
  const int t = threadIdx.x;
  for (int c = t; c < col_blocks; c += blockDim.x) removed[c] = 0ull;
  __syncthreads();
  for (int cb = 0; cb < col_blocks; ++cb) {
    const int base = cb * CXR_NMS_TILE;
    const int nb = min(CXR_NMS_TILE, n - base);
    if (t < nb) diag[t] = mask[(long long)(base + t) * col_blocks + cb];
    __syncthreads();
    if (t == 0) {
      cxr_u64 rem = removed[cb];
      int k = 0;
      for (int j = 0; j < nb; ++j) {
        if (!((rem >> j) & 1ull)) {
          kept_list[k++] = j;
          rem |= diag[j];
        }
      }
      removed[cb] = rem;
      n_kept = k;
    }
    __syncthreads();
    const int nk = n_kept;
    if (t < nb) keep[base + t] = ((removed[cb] >> t) & 1ull) ? 0 : 1;
    const int ncols = col_blocks - cb - 1;
    const int total = nk * ncols;
#pragma unroll 4
    for (int p = t; p < total; p += blockDim.x) {
      const int c = cb + 1 + p % ncols;
      const cxr_u64 m = mask[(long long)(base + kept_list[p / ncols]) * col_blocks + c];
      if (m) atomicOr(&removed[c], m);
    }
    __syncthreads();
  }
}
