// Plain-data description of one 1xN sparse GEMM call, shared by the binding and the ISA kernels.
// No torch or std headers here: the ISA translation units are compiled for different instruction
// sets and must not emit shared inline (COMDAT) functions that the linker could pick for the wrong ISA.
#pragma once
#include <cstdint>

struct PkArgs {
  const float* x;          // activation planes of image 0; image n at x + n * x_img_stride
  const int64_t* ucol;     // unit (packed index value) -> offset of its first X row from the image base
  const int64_t* toff;     // [T] offsets of the taps of one unit, relative to the unit's offset
  const float* vals;       // [nnz_units][T][N]
  const int32_t* idx;      // [nnz_units]
  const int64_t* rowptr;   // [nbr + 1]
  const int64_t* out_row;  // [nbr * N] slot -> output channel, -1 for padding slots
  const float* bias;       // [nbr * N] bias per slot, or nullptr
  float* y;                // output of image 0: [M][Hout*Wout]
  int64_t x_img_stride;
  int64_t y_img_stride;
  int64_t y_plane;  // Hout*Wout: distance between output channels
  int64_t pv;       // virtual positions per image: (Hout-1)*wq + Wout
  int64_t wq;       // virtual row width (>= wout); positions with q % wq >= wout are discarded
  int64_t wout;
  int64_t n_ptiles; // P tiles per image
  int32_t n;        // block height N
  int32_t t;        // taps per unit
  int32_t nbr;      // block-rows
  int32_t pt;       // P tile width in floats
};

// Work items are (image, P tile, block-row), block-row fastest; each call runs items [begin, end).
void pk_run_avx2(const PkArgs& a, int64_t begin, int64_t end);
void pk_run_avx512(const PkArgs& a, int64_t begin, int64_t end);
// Tile width (floats) the kernel wants for block height n on this ISA.
int pk_tile_avx2(int n);
int pk_tile_avx512(int n);
