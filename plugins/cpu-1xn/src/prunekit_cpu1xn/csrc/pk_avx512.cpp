// AVX-512 build of the 1xN kernel. Target set per function by pragma (no -m flags), so the library
// loads on any x86-64 CPU and this code runs only when the binding's runtime check allows it.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "pk_args.h"

#pragma GCC target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")
#define PK_ISA 512
#include "pk_impl.h"

void pk_run_avx512(const PkArgs& a, int64_t br0, int64_t br1, int64_t t0, int64_t t1) { run_any(a, br0, br1, t0, t1); }
int pk_tile_avx512(int n) { return tile_width(n); }
void pk_gemv_avx512(const PkArgs& a, int64_t br0, int64_t br1) { gemv_any(a, br0, br1); }
void pk_pointwise_avx512(const float* src, float* dst, int64_t n, float shift, const float* res, int act) {
  pointwise_any(src, dst, n, shift, res, act);
}
void pk_maxpool_avx512(const float* src, float* dst, int64_t h, int64_t w, int k, int s, int p, float* tmp) {
  maxpool_any(src, dst, h, w, k, s, p, tmp);
}
void pk_phase_row_avx512(const float* src, float* d, int64_t wq, int64_t sw, int64_t off, int64_t wd) {
  phase_row_any(src, d, wq, sw, off, wd);
}
