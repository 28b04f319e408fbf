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
