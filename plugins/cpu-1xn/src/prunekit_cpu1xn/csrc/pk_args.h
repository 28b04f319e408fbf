// Plain-data description of one 1xN sparse GEMM call, shared by the binding and the ISA kernels.
// No torch or std headers here: the ISA translation units are compiled for different instruction
// sets and must not emit shared inline (COMDAT) functions that the linker could pick for the wrong ISA.
#pragma once
#include <cstdint>

struct PkArgs {
  const float* x;          // activations of image 0 (phase planes, or the NCHW input itself); image n at x + n * x_img_stride
  const int64_t* ucol;     // unit (packed index value) -> offset of its first X row from the image base
  const int64_t* toff;     // [T] offsets of the taps of one unit, relative to the unit's offset (may be negative: direct)
  const float* vals;       // [nnz_units][T][N]
  const int32_t* idx;      // [nnz_units]
  const int64_t* rowptr;   // [nbr + 1]
  const int64_t* out_row;  // [nbr * N] slot -> output channel, -1 for padding slots
  const float* bias;       // [nbr * N] the layer's bias per slot (the accumulators' start), or nullptr
  float* y;                // output of image 0: [M][Hout*Wout]
  const float* shift;      // [M] epilogue shift per output channel, added to the finished sum, or nullptr
  const float* res;        // residual added before the activation, laid out like y (image 0), or nullptr
  const uint32_t* vmask;   // per SIMD vector of virtual positions: lanes that are real outputs
  const int64_t* vbase;    // per SIMD vector: output offset (in a channel plane) of its first kept lane
  const uint16_t* tmask;   // direct mode: [T][nvec] lanes whose tap lies inside the input (AVX-512), else nullptr
  const int32_t* utap;     // direct mode, taps = 1 per unit: unit -> its tap (row of tmask); nullptr: row = tap loop index
  int64_t nvec;            // vectors per image (direct mode: row length of tmask)
  int64_t x_img_stride;
  int64_t y_img_stride;
  int64_t y_plane;  // Hout*Wout: distance between output channels
  int64_t pv;       // virtual positions per image: (Hout-1)*wq + Wout
  int64_t n_ptiles; // P tiles per image
  int64_t chunk_tiles; // (image, P tile) pairs walked together, sized for L2
  int64_t nimg;        // images (gemv path)
  int32_t n;        // block height N
  int32_t t;        // taps per unit
  int32_t nbr;      // block-rows
  int32_t pt;       // P tile width in floats
  int32_t act;      // epilogue activation after bias and residual: 0 none, 1 relu, 2 relu6
};

// Runs block-rows [br0, br1) over the (image, P tile) pairs [t0, t1), tile index = image * n_ptiles + tile.
void pk_run_avx2(const PkArgs& a, int64_t br0, int64_t br1, int64_t t0, int64_t t1);
void pk_run_avx512(const PkArgs& a, int64_t br0, int64_t br1, int64_t t0, int64_t t1);
// Block-rows [br0, br1) for every image and position, SIMD over the N rows (few positions; taps = 1).
void pk_gemv_avx2(const PkArgs& a, int64_t br0, int64_t br1);
void pk_gemv_avx512(const PkArgs& a, int64_t br0, int64_t br1);
// Tile width (floats) the kernel wants for block height n on this ISA.
int pk_tile_avx2(int n);
int pk_tile_avx512(int n);
// Epilogue pieces for one channel plane: dst = act(src + shift [+ res]) (dst may be src), and max pooling
// (kernel k, stride s, padding p; the window is clipped to the plane, i.e. -inf padding, NaN propagates).
// tmp: scratch of at least W + 2 * p + 64 floats.
void pk_pointwise_avx2(const float* src, float* dst, int64_t n, float shift, const float* res, int act);
void pk_pointwise_avx512(const float* src, float* dst, int64_t n, float shift, const float* res, int act);
void pk_maxpool_avx2(const float* src, float* dst, int64_t h, int64_t w, int k, int s, int p, float* tmp);
void pk_maxpool_avx512(const float* src, float* dst, int64_t h, int64_t w, int k, int s, int p, float* tmp);
// One row of a phase plane: d[j] = src[j * sw + off] where 0 <= j * sw + off < wd, else 0, for j in [0, wq).
void pk_phase_row_avx2(const float* src, float* d, int64_t wq, int64_t sw, int64_t off, int64_t wd);
void pk_phase_row_avx512(const float* src, float* d, int64_t wq, int64_t sw, int64_t off, int64_t wd);
