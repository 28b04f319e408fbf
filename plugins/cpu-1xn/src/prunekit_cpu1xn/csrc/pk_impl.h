// The 1xN micro-kernel, written once and compiled per instruction set (pk_avx2.cpp, pk_avx512.cpp).
// Formulation (kernels.md 2.1): activations channel-major, SIMD across output positions, R output rows
// of one block-row held in R x V vector accumulators, each packed weight broadcast against V vectors of
// the activation row it indexes. Everything here has internal linkage (see pk_args.h).
#pragma once
#include <cstring>

#include "pk_args.h"

namespace {

#if PK_ISA == 512
constexpr int W = 16;
typedef __m512 vf;
typedef __mmask16 vmask;
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vload_m(const float* p, vmask m) { return _mm512_maskz_loadu_ps(m, p); }
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }
inline void vstore_m(float* p, vf v, vmask m) { _mm512_mask_storeu_ps(p, m, v); }
inline vf vset1(float f) { return _mm512_set1_ps(f); }
inline vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vmask vmask_n(int n) { return (vmask)((1u << n) - 1u); }
inline vf vload_bits(const float* p, uint32_t bits) { return _mm512_maskz_loadu_ps((__mmask16)bits, p); }
inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }  // b when either is NaN: pass the value second
inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
constexpr uint32_t FULL = 0xFFFFu;
inline void store_kept(float* dst, vf v, uint32_t keep) {
  const vf packed = _mm512_maskz_compress_ps((__mmask16)keep, v);
  _mm512_mask_storeu_ps(dst, (__mmask16)((1u << __builtin_popcount(keep)) - 1u), packed);
}
// the values at src (contiguous) into the kept lanes: what store_kept wrote there, read back
inline vf load_kept(const float* src, uint32_t keep) { return _mm512_maskz_expandloadu_ps((__mmask16)keep, src); }
// (R rows, V vectors): accumulators R*V <= 24 of 32 zmm.
template <int N> struct Shape { static constexpr int R = N >= 8 ? 8 : N; static constexpr int V = N == 2 ? 4 : (N == 4 ? 4 : 3); };
#else
constexpr int W = 8;
typedef __m256 vf;
typedef __m256i vmask;
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vload_m(const float* p, vmask m) { return _mm256_maskload_ps(p, m); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }
inline void vstore_m(float* p, vf v, vmask m) { _mm256_maskstore_ps(p, m, v); }
inline vf vset1(float f) { return _mm256_set1_ps(f); }
inline vf vfma(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vmask vmask_n(int n) { return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)); }
inline vf vload_bits(const float* p, uint32_t bits) {
  const __m256i lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i m = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)bits), lanes), lanes);
  return _mm256_maskload_ps(p, m);
}
inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }  // b when either is NaN: pass the value second
inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
constexpr uint32_t FULL = 0xFFu;
inline void store_kept(float* dst, vf v, uint32_t keep) {
  alignas(32) float tmp[8];
  _mm256_store_ps(tmp, v);
  int k = 0;
  for (int l = 0; l < 8; ++l)
    if (keep >> l & 1u) dst[k++] = tmp[l];
}
inline vf load_kept(const float* src, uint32_t keep) {
  alignas(32) float tmp[8];
  int k = 0;
  for (int l = 0; l < 8; ++l) tmp[l] = (keep >> l & 1u) ? src[k++] : 0.0f;
  return _mm256_load_ps(tmp);
}
// accumulators R*V <= 12 of 16 ymm.
template <int N> struct Shape { static constexpr int R = N >= 4 ? 4 : N; static constexpr int V = N == 2 ? 4 : 3; };
#endif

inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

// Epilogue activation (bias is already in the accumulator, the residual added before this).
inline vf activate(vf v, int act) {
  if (act == 0) return v;
  v = vmax(vset1(0.0f), v);  // NaN stays NaN, as in torch.relu
  return act == 2 ? vmin(vset1(6.0f), v) : v;
}

// One (image, P tile, R rows) unit of work. VT vectors, the last holding `rem` valid lanes when TAIL.
// DIRECT: X is the unpadded input itself; each tap's load is masked by tmask (lanes whose tap falls in the
// zero padding, or past the last position, read nothing), so no padded copy is made and no column is wasted.
template <int R, int VT, bool TAIL, bool DIRECT>
inline void tile(const PkArgs& a, const float* xb, int64_t j0, int64_t j1, int64_t slot, int64_t img, int64_t p0,
                 int rem) {
  vf acc[R][VT];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const vf b = vset1(a.bias ? a.bias[slot + r] : 0.0f);
#pragma GCC unroll 4
    for (int v = 0; v < VT; ++v) acc[r][v] = b;
  }
  const vmask m = vmask_n(TAIL ? rem : W);
  const int T = a.t;
  const int64_t N = a.n;
  const int64_t* toff = a.toff;
  const int64_t v0 = p0 / W;
  for (int64_t j = j0; j < j1; ++j) {
    const float* xr = xb + a.ucol[a.idx[j]];
    const float* w = a.vals + (j * T) * N + (slot % N);
    for (int t = 0; t < T; ++t, w += N) {
      const float* xp = xr + toff[t];
      vf xv[VT];
      if (DIRECT) {
        const uint16_t* mk = a.tmask + (a.utap ? a.utap[a.idx[j]] : t) * a.nvec + v0;
#pragma GCC unroll 4
        for (int v = 0; v < VT; ++v) xv[v] = vload_bits(xp + v * W, mk[v]);
      } else {
#pragma GCC unroll 4
        for (int v = 0; v < VT; ++v) xv[v] = (TAIL && v == VT - 1) ? vload_m(xp + v * W, m) : vload(xp + v * W);
      }
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) {
        const vf wb = vset1(w[r]);
#pragma GCC unroll 4
        for (int v = 0; v < VT; ++v) acc[r][v] = vfma(xv[v], wb, acc[r][v]);
      }
    }
  }
  // Store: vector vi of the image's virtual positions keeps the lanes in vmask[vi] (columns < Wout, positions
  // < pv); kept lanes land contiguously in Y from vbase[vi] (output rows are contiguous), so a vector is
  // one plain store, or one compress + masked store where it straddles dropped columns.
  // Epilogue on the way out: + residual (read at the same place), then the activation.
  float* ybase = a.y + img * a.y_img_stride;
  const float* rbase = a.res ? a.res + img * a.y_img_stride : nullptr;
  const int act = a.act;
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const int64_t o = a.out_row[slot + r];
    if (o < 0) continue;
    float* yp = ybase + o * a.y_plane;
    const float* rp = rbase ? rbase + o * a.y_plane : nullptr;
#pragma GCC unroll 4
    for (int v = 0; v < VT; ++v) {
      const uint32_t keep = a.vmask[v0 + v];
      const int64_t off = a.vbase[v0 + v];
      vf val = acc[r][v];
      if (a.shift) val = vadd(val, vset1(a.shift[o]));  // in the order the unfused ops would round
      if (keep == FULL) {
        if (rp) val = vadd(val, vload(rp + off));
        vstore(yp + off, activate(val, act));
      } else {
        if (rp) val = vadd(val, load_kept(rp + off, keep));
        store_kept(yp + off, activate(val, act), keep);
      }
    }
  }
}

template <int N, bool DIRECT>
inline void run_n(const PkArgs& a, int64_t br0, int64_t br1, int64_t t0, int64_t t1) {
  constexpr int R = Shape<N>::R, V = Shape<N>::V, PT = V * W;
  // Loop order: a chunk of (image, P tile) pairs small enough to stay in L2, then this range's
  // block-rows, then the tiles of the chunk: every weight row is read once per chunk, X once per row.
  for (int64_t c0 = t0; c0 < t1; c0 += a.chunk_tiles) {
    const int64_t c1 = min64(t1, c0 + a.chunk_tiles);
    for (int64_t br = br0; br < br1; ++br) {
      const int64_t j0 = a.rowptr[br], j1 = a.rowptr[br + 1];
      for (int64_t tt = c0; tt < c1; ++tt) {
        const int64_t pt = tt % a.n_ptiles;
        const int64_t img = tt / a.n_ptiles;
        const int64_t p0 = pt * PT;
        const int64_t len = min64(PT, a.pv - p0);
        const float* xb = a.x + img * a.x_img_stride + p0;
        const int vt = (int)((len + W - 1) / W);
        const int rem = (int)(len - (vt - 1) * W);
        for (int c = 0; c < N; c += R) {
          const int64_t slot = br * N + c;
          if (len == PT) {
            tile<R, V, false, DIRECT>(a, xb, j0, j1, slot, img, p0, W);
          } else if (vt == 1) {
            tile<R, 1, true, DIRECT>(a, xb, j0, j1, slot, img, p0, rem);
          } else if (vt == 2) {
            tile<R, (V >= 2 ? 2 : 1), true, DIRECT>(a, xb, j0, j1, slot, img, p0, rem);
          } else if (vt == 3) {
            tile<R, (V >= 3 ? 3 : 1), true, DIRECT>(a, xb, j0, j1, slot, img, p0, rem);
          } else {
            tile<R, V, true, DIRECT>(a, xb, j0, j1, slot, img, p0, rem);
          }
        }
      }
    }
  }
}

// One position per image (Linear at batch 1, 1x1 convs on 1x1 maps): SIMD over the N rows of a block instead,
// one broadcast activation against the N contiguous values of each kept block; two partial sums per row
// (even/odd blocks) to halve the FMA dependency chain.
template <int N>
inline void gemv_n(const PkArgs& a, int64_t br0, int64_t br1) {
  for (int64_t br = br0; br < br1; ++br) {
    const int64_t j0 = a.rowptr[br], j1 = a.rowptr[br + 1];
    for (int64_t img = 0; img < a.nimg; ++img) {
      const float* xb = a.x + img * a.x_img_stride;
      float* yb = a.y + img * a.y_img_stride;
      for (int64_t p = 0; p < a.pv; ++p) {
        float acc0[N], acc1[N];
        for (int r = 0; r < N; ++r) {
          acc0[r] = a.bias ? a.bias[br * N + r] : 0.0f;
          acc1[r] = 0.0f;
        }
        int64_t j = j0;
        for (; j + 1 < j1; j += 2) {
          const float x0 = xb[a.ucol[a.idx[j]] + p], x1 = xb[a.ucol[a.idx[j + 1]] + p];
          const float* w0 = a.vals + j * N;
          for (int r = 0; r < N; ++r) {
            acc0[r] += w0[r] * x0;
            acc1[r] += w0[N + r] * x1;
          }
        }
        if (j < j1) {
          const float x0 = xb[a.ucol[a.idx[j]] + p];
          const float* w0 = a.vals + j * N;
          for (int r = 0; r < N; ++r) acc0[r] += w0[r] * x0;
        }
        for (int r = 0; r < N; ++r) {
          const int64_t o = a.out_row[br * N + r];
          if (o < 0) continue;
          float v = acc0[r] + acc1[r];
          if (a.shift) v += a.shift[o];
          if (a.res) v += a.res[img * a.y_img_stride + o * a.y_plane + p];
          if (a.act) {
            v = v > 0.0f || v != v ? v : 0.0f;  // NaN stays NaN
            if (a.act == 2 && v > 6.0f) v = 6.0f;
          }
          yb[o * a.y_plane + p] = v;
        }
      }
    }
  }
}

inline void gemv_any(const PkArgs& a, int64_t br0, int64_t br1) {
  switch (a.n) {
    case 2: gemv_n<2>(a, br0, br1); break;
    case 4: gemv_n<4>(a, br0, br1); break;
    case 8: gemv_n<8>(a, br0, br1); break;
    case 16: gemv_n<16>(a, br0, br1); break;
    case 32: gemv_n<32>(a, br0, br1); break;
    default: break;
  }
}

inline int tile_width(int n) {
  switch (n) {
    case 2: return Shape<2>::V * W;
    case 4: return Shape<4>::V * W;
    case 8: return Shape<8>::V * W;
    case 16: return Shape<16>::V * W;
    default: return Shape<32>::V * W;
  }
}

template <bool DIRECT>
inline void run_mode(const PkArgs& a, int64_t br0, int64_t br1, int64_t t0, int64_t t1) {
  switch (a.n) {
    case 2: run_n<2, DIRECT>(a, br0, br1, t0, t1); break;
    case 4: run_n<4, DIRECT>(a, br0, br1, t0, t1); break;
    case 8: run_n<8, DIRECT>(a, br0, br1, t0, t1); break;
    case 16: run_n<16, DIRECT>(a, br0, br1, t0, t1); break;
    case 32: run_n<32, DIRECT>(a, br0, br1, t0, t1); break;
    default: break;  // the binding rejects other N before calling
  }
}

inline void run_any(const PkArgs& a, int64_t br0, int64_t br1, int64_t t0, int64_t t1) {
  if (a.tmask) run_mode<true>(a, br0, br1, t0, t1);
  else run_mode<false>(a, br0, br1, t0, t1);
}

// ---------------------------------------------------------------- epilogue pieces for dense outputs

inline vf vmax_nan(vf acc, vf q) {  // max that keeps a NaN of either operand
#if PK_ISA == 512
  const vf m = _mm512_max_ps(acc, q);  // q when either is NaN
  return _mm512_mask_mov_ps(m, _mm512_cmp_ps_mask(acc, acc, _CMP_UNORD_Q), acc);
#else
  const vf m = _mm256_max_ps(acc, q);
  return _mm256_blendv_ps(m, acc, _mm256_cmp_ps(acc, acc, _CMP_UNORD_Q));
#endif
}

inline void pointwise_any(const float* src, float* dst, int64_t n, float shift, const float* res, int act) {
  const vf s = vset1(shift);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    vf v = vadd(vload(src + i), s);
    if (res) v = vadd(v, vload(res + i));
    vstore(dst + i, activate(v, act));
  }
  if (i < n) {
    const vmask m = vmask_n((int)(n - i));
    vf v = vadd(vload_m(src + i, m), s);
    if (res) v = vadd(v, vload_m(res + i, m));
    vstore_m(dst + i, activate(v, act), m);
  }
}

#if PK_ISA == 512
inline vf evens(const float* p) {  // p[0], p[2], ..., p[30]
  const __m512i idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  return _mm512_permutex2var_ps(_mm512_loadu_ps(p), idx, _mm512_loadu_ps(p + 16));
}
#endif

inline void maxpool_any(const float* src, float* dst, int64_t h, int64_t w, int k, int s, int p, float* tmp) {
  const int64_t ho = (h + 2 * p - k) / s + 1, wo = (w + 2 * p - k) / s + 1;
  const float ninf = -__builtin_inff();
  const int64_t tw = w + 2 * p + 4 * W;  // padded row: p cells of -inf, the row, -inf to the end
  for (int64_t c = 0; c < tw; ++c) tmp[c] = ninf;
  float* row = tmp + p;
  for (int64_t oh = 0; oh < ho; ++oh) {
    const int64_t r0 = oh * s - p < 0 ? 0 : oh * s - p;
    const int64_t r1 = oh * s - p + k > h ? h : oh * s - p + k;
    // vertical max of rows [r0, r1) into row[0, w)
    int64_t c = 0;
    for (; c + W <= w; c += W) {
      vf m = vload(src + r0 * w + c);
      for (int64_t r = r0 + 1; r < r1; ++r) m = vmax_nan(m, vload(src + r * w + c));
      vstore(row + c, m);
    }
    for (; c < w; ++c) {
      float m = src[r0 * w + c];
      for (int64_t r = r0 + 1; r < r1; ++r) {
        const float q = src[r * w + c];
        m = (q > m || q != q) && m == m ? q : m;
      }
      row[c] = m;
    }
    // horizontal: out[ow] = max over j < k of tmp[ow * s + j]
    float* d = dst + oh * wo;
    int64_t ow = 0;
#if PK_ISA == 512
    if (s == 2) {
      for (; ow + W <= wo; ow += W) {
        vf m = evens(tmp + 2 * ow);
        for (int j = 1; j < k; ++j) m = vmax_nan(m, evens(tmp + 2 * ow + j));
        vstore(d + ow, m);
      }
    }
#endif
    if (s == 1) {
      for (; ow + W <= wo; ow += W) {
        vf m = vload(tmp + ow);
        for (int j = 1; j < k; ++j) m = vmax_nan(m, vload(tmp + ow + j));
        vstore(d + ow, m);
      }
    }
    for (; ow < wo; ++ow) {
      float m = tmp[ow * s];
      for (int j = 1; j < k; ++j) {
        const float q = tmp[ow * s + j];
        m = (q > m || q != q) && m == m ? q : m;
      }
      d[ow] = m;
    }
  }
}

inline void phase_row_any(const float* src, float* d, int64_t wq, int64_t sw, int64_t off, int64_t wd) {
  // columns j in [lo, hi) read the row; the rest are zero padding
  int64_t lo = off >= 0 ? 0 : (-off + sw - 1) / sw;
  int64_t hi = wd - 1 - off < 0 ? 0 : (wd - 1 - off) / sw + 1;
  if (hi > wq) hi = wq;
  if (lo > hi) lo = hi;
  for (int64_t j = 0; j < lo; ++j) d[j] = 0.0f;
  for (int64_t j = hi; j < wq; ++j) d[j] = 0.0f;
  int64_t j = lo;
  if (sw == 1) {
    std::memcpy(d + lo, src + lo + off, (hi - lo) * sizeof(float));
    return;
  }
#if PK_ISA == 512
  if (sw == 2)
    for (; j + W <= hi && 2 * (j + W) + off <= wd; j += W) vstore(d + j, evens(src + 2 * j + off));
#endif
  for (; j < hi; ++j) d[j] = src[j * sw + off];
}

}  // namespace
