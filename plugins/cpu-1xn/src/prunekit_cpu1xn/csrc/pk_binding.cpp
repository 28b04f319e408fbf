// Torch binding of the 1xN kernel: argument checks, activation planes, ISA dispatch, threading.
//
// Convolution as an implicit GEMM without im2col: the input is copied once into zero-padded "phase
// planes" (stride s splits each padded channel into s*s sub-grids), so that for every kernel tap the
// activation row it needs is a contiguous run of a plane, shifted by a constant offset. Output positions
// are enumerated on the plane's (slightly wider) row pitch wq; the few columns ow >= Wout are computed
// and dropped. 1x1 stride-1 unpadded convs (and Linear) read the input as it is, with no copy at all.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <optional>
#include <vector>

#include "pk_args.h"

namespace {

// Phase planes live in a per-calling-thread buffer that only grows: allocating them per call made every
// call pay fresh page faults under glibc malloc (multi-MB blocks are mmapped and returned on free).
struct Workspace {
  std::unique_ptr<float[]> data;
  int64_t size = 0;
  float* get(int64_t n) {
    if (n > size) {
      data.reset(new float[n]);
      size = n;
    }
    return data.get();
  }
};

// Per-geometry tables, built once and kept per calling thread (a model has a handful of geometries; rebuilding
// them on every call cost more than a small layer's arithmetic).
struct StoreMap {
  std::vector<uint32_t> vmask;
  std::vector<int64_t> vbase;
};
struct TapMask {
  std::vector<uint16_t> bits;  // [T][nvec]
};

template <class V>
V& cached(std::map<std::vector<int64_t>, V>& cache, const std::vector<int64_t>& key, bool& fresh) {
  auto it = cache.find(key);
  fresh = it == cache.end();
  if (fresh) {
    if (cache.size() > 256) cache.clear();
    it = cache.emplace(key, V()).first;
  }
  return it->second;
}

// virtual position q is output (q / wq, q % wq) when q % wq < Wout; built with running counters
const StoreMap& store_map(int64_t pv, int64_t wq, int64_t Wout, int64_t W, int64_t nvec) {
  static thread_local std::map<std::vector<int64_t>, StoreMap> cache;
  bool fresh;
  StoreMap& sm = cached(cache, {pv, wq, Wout, W, nvec}, fresh);
  if (fresh) {
    sm.vmask.assign(nvec, 0);
    sm.vbase.assign(nvec, 0);
    int64_t oh = 0, ow = 0;  // coordinates of q
    for (int64_t v = 0; v < nvec; ++v) {
      sm.vbase[v] = oh * Wout + std::min(ow, Wout);
      uint32_t m = 0;
      for (int64_t l = 0; l < W; ++l) {
        if (v * W + l < pv && ow < Wout) m |= 1u << l;
        if (++ow == wq) {
          ow = 0;
          ++oh;
        }
      }
      sm.vmask[v] = m;
    }
  }
  return sm;
}

// direct mode (stride 1, Wout == W): lane q = oh * W + ow of tap (i, j) reads input (oh - ph + i*dh, ow - pw + j*dw)
const TapMask& tap_mask(int64_t H, int64_t Wd, int64_t Hout, int64_t kh, int64_t kw, int64_t ph, int64_t pw,
                        int64_t dh, int64_t dw, int64_t nvec) {
  static thread_local std::map<std::vector<int64_t>, TapMask> cache;
  bool fresh;
  TapMask& tm = cached(cache, {H, Wd, Hout, kh, kw, ph, pw, dh, dw, nvec}, fresh);
  if (fresh) {
    const int64_t P = Hout * Wd;
    tm.bits.assign(kh * kw * nvec, 0);
    for (int64_t i = 0; i < kh; ++i)
      for (int64_t j = 0; j < kw; ++j) {
        uint16_t* row = tm.bits.data() + (i * kw + j) * nvec;
        for (int64_t q = 0; q < std::min(P, nvec * 16); ++q) {
          const int64_t r = q / Wd + i * dh - ph, c = q % Wd + j * dw - pw;
          if (r >= 0 && r < H && c >= 0 && c < Wd) row[q / 16] |= (uint16_t)(1u << (q % 16));
        }
      }
  }
  return tm;
}

int64_t cpu_isa() {
  static const int64_t isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
      return int64_t(512);
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return int64_t(2);
    return int64_t(0);
  }();
  return isa;
}

// Per-plane epilogue work, split over planes (images x channels) between threads, on the best ISA.
// pool && !res: pool first, then shift and activation on the pooled plane (both are monotone, so they
// commute with max exactly, and 1/s^2 of the elements are touched); else shift, residual, activation, pool.
void planes_epilogue(const float* src, float* dst, int64_t B, int64_t C, int64_t H, int64_t Wd, const float* shift,
                     const float* res, int64_t act, int64_t pk, int64_t ps, int64_t pp) {
  const bool avx512 = cpu_isa() == 512;
  const int64_t HW = H * Wd;
  const int64_t Ho = pk > 0 ? (H + 2 * pp - pk) / ps + 1 : H, Wo = pk > 0 ? (Wd + 2 * pp - pk) / ps + 1 : Wd;
  auto pw = [&](const float* a, float* d, int64_t n, float sh, const float* r) {
    if (avx512) pk_pointwise_avx512(a, d, n, sh, r, (int)act);
    else pk_pointwise_avx2(a, d, n, sh, r, (int)act);
  };
  auto mp = [&](const float* a, float* d, float* tmp) {
    if (avx512) pk_maxpool_avx512(a, d, H, Wd, (int)pk, (int)ps, (int)pp, tmp);
    else pk_maxpool_avx2(a, d, H, Wd, (int)pk, (int)ps, (int)pp, tmp);
  };
  at::parallel_for(0, B * C, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> tmp(pk > 0 ? Wd + 2 * pp + 64 : 0);
    std::vector<float> plane(pk > 0 && res ? HW : 0);
    for (int64_t bc = b0; bc < b1; ++bc) {
      const float sh = shift ? shift[bc % C] : 0.0f;
      const float* a = src + bc * HW;
      const float* r = res ? res + bc * HW : nullptr;
      float* d = dst + bc * Ho * Wo;
      if (pk <= 0) {
        pw(a, d, HW, sh, r);
      } else if (!r) {
        mp(a, d, tmp.data());
        if (sh != 0.0f || act) pw(d, d, Ho * Wo, sh, nullptr);
      } else {
        pw(a, plane.data(), HW, sh, r);
        mp(plane.data(), d, tmp.data());
      }
    }
  });
}

at::Tensor conv2d(const at::Tensor& x, const at::Tensor& vals, const at::Tensor& idx, const at::Tensor& rowptr,
                  const at::Tensor& out_row, const std::optional<at::Tensor>& bias, int64_t M, int64_t kh, int64_t kw,
                  int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, bool runs, int64_t isa, bool poison,
                  const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& residual, int64_t act,
                  int64_t pool_k, int64_t pool_s, int64_t pool_p) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() == 4,
              "prunekit cpu-1xn: input must be a contiguous 4-D float32 CPU tensor, got ", x.scalar_type(), " ",
              x.sizes());
  TORCH_CHECK(vals.scalar_type() == at::kFloat && vals.is_contiguous() && vals.dim() >= 2, "cpu-1xn: bad vals");
  TORCH_CHECK(idx.scalar_type() == at::kInt && idx.is_contiguous(), "cpu-1xn: idx must be contiguous int32");
  TORCH_CHECK(rowptr.scalar_type() == at::kLong && rowptr.is_contiguous() && rowptr.dim() == 1, "cpu-1xn: bad rowptr");
  TORCH_CHECK(out_row.scalar_type() == at::kLong && out_row.is_contiguous(), "cpu-1xn: bad out_row");
  TORCH_CHECK(kh >= 1 && kw >= 1 && sh >= 1 && sw >= 1 && dh >= 1 && dw >= 1 && ph >= 0 && pw >= 0,
              "cpu-1xn: bad conv geometry");
  const int64_t N = vals.size(-1);
  TORCH_CHECK(N == 2 || N == 4 || N == 8 || N == 16 || N == 32, "cpu-1xn: N must be 2, 4, 8, 16 or 32, got ", N);
  const int64_t T = runs ? kh * kw : 1;
  const int64_t nbr = rowptr.numel() - 1;
  TORCH_CHECK(nbr >= 1 && out_row.numel() == nbr * N && nbr * N >= M, "cpu-1xn: out_row/rowptr do not match M");
  TORCH_CHECK(vals.numel() == idx.numel() * T * N, "cpu-1xn: vals do not match idx");
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == nbr * N,
                "cpu-1xn: bad bias");
  }
  TORCH_CHECK(act >= 0 && act <= 2, "cpu-1xn: act must be 0 (none), 1 (relu) or 2 (relu6)");
  if (shift.has_value()) {
    TORCH_CHECK(shift->scalar_type() == at::kFloat && shift->is_contiguous() && shift->numel() == M,
                "cpu-1xn: shift must be a contiguous float32 tensor of the ", M, " output channels");
  }
  const int64_t best = cpu_isa();
  if (isa == 0) isa = best;
  TORCH_CHECK((isa == 512 && best == 512) || (isa == 2 && best >= 2),
              "cpu-1xn: instruction set ", isa, " not available on this CPU (best: ", best, ")");

  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), Wd = x.size(3);
  const int64_t Hout = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  const int64_t Wout = (Wd + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(H + 2 * ph >= dh * (kh - 1) + 1 && Wd + 2 * pw >= dw * (kw - 1) + 1 && Hout > 0 && Wout > 0,
              "cpu-1xn: input ", x.sizes(), " is smaller than the kernel");
  if (residual.has_value()) {
    TORCH_CHECK(residual->scalar_type() == at::kFloat && residual->is_contiguous() && residual->dim() == 4 &&
                    residual->size(0) == B && residual->size(1) == M && residual->size(2) == Hout && residual->size(3) == Wout,
                "cpu-1xn: residual must be a contiguous float32 tensor [", B, ", ", M, ", ", Hout, ", ", Wout, "], got ",
                residual->sizes());
  }
  const bool pool = pool_k > 0;
  int64_t Hp = Hout, Wp = Wout;
  if (pool) {
    TORCH_CHECK(pool_s >= 1 && pool_p >= 0 && 2 * pool_p <= pool_k && Hout + 2 * pool_p >= pool_k && Wout + 2 * pool_p >= pool_k,
                "cpu-1xn: bad max-pool geometry");
    Hp = (Hout + 2 * pool_p - pool_k) / pool_s + 1;
    Wp = (Wout + 2 * pool_p - pool_k) / pool_s + 1;
  }
  auto y = at::empty({B, M, Hp, Wp}, x.options());
  if (poison) y.fill_(std::numeric_limits<float>::quiet_NaN());  // tests: any unwritten element shows
  if (B == 0) return y;
  // with pooling the conv output goes to a per-thread scratch first, then is pooled into y
  static thread_local Workspace pool_ws;
  float* yconv = y.data_ptr<float>();
  if (pool) {
    yconv = pool_ws.get(B * M * Hout * Wout);
    if (poison) std::fill(yconv, yconv + B * M * Hout * Wout, std::numeric_limits<float>::quiet_NaN());
  }

  const bool as_is = kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0;
  // direct (AVX-512): stride 1 and an output as wide as the input; taps read the input in place, masked
  const bool direct = !as_is && isa == 512 && sh == 1 && sw == 1 && Wout == Wd;
  std::vector<int64_t> toff_full(kh * kw, 0);
  int64_t wq, chan_stride;
  const float* xp;
  if (as_is || direct) {
    wq = Wd;
    chan_stride = H * Wd;
    xp = x.data_ptr<float>();
    if (direct)
      for (int64_t i = 0; i < kh; ++i)
        for (int64_t j = 0; j < kw; ++j) toff_full[i * kw + j] = (i * dh - ph) * Wd + (j * dw - pw);
  } else {
    wq = Wout + ((kw - 1) * dw) / sw;
    const int64_t hq = Hout + ((kh - 1) * dh) / sh;
    const int64_t plane = hq * wq;
    std::vector<int64_t> slot_of(sh * sw, -1);
    std::vector<int64_t> phase_a, phase_b;
    for (int64_t i = 0; i < kh; ++i)
      for (int64_t j = 0; j < kw; ++j) {
        const int64_t a = (i * dh) % sh, b = (j * dw) % sw;
        if (slot_of[a * sw + b] < 0) {
          slot_of[a * sw + b] = (int64_t)phase_a.size();
          phase_a.push_back(a);
          phase_b.push_back(b);
        }
        toff_full[i * kw + j] = slot_of[a * sw + b] * plane + ((i * dh) / sh) * wq + (j * dw) / sw;
      }
    const int64_t nph = (int64_t)phase_a.size();
    chan_stride = nph * plane;
    static thread_local Workspace ws;
    const float* src_all = x.data_ptr<float>();
    float* dst_all = ws.get(B * C * chan_stride);
    at::parallel_for(0, B * C, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t bc = b0; bc < b1; ++bc) {
        const float* src = src_all + bc * H * Wd;
        for (int64_t s = 0; s < nph; ++s) {
          float* dst = dst_all + bc * chan_stride + s * plane;
          const int64_t pa = phase_a[s], pb = phase_b[s];
          for (int64_t i = 0; i < hq; ++i) {
            float* d = dst + i * wq;
            const int64_t row = i * sh + pa - ph;
            if (row < 0 || row >= H) {
              std::memset(d, 0, wq * sizeof(float));
              continue;
            }
            if (isa == 512) pk_phase_row_avx512(src + row * Wd, d, wq, sw, pb - pw, Wd);
            else pk_phase_row_avx2(src + row * Wd, d, wq, sw, pb - pw, Wd);
          }
        }
      }
    });
    xp = dst_all;
  }
  const int64_t units = runs ? C : C * kh * kw;
  std::vector<int64_t> ucol(units);
  std::vector<int64_t> toff;
  if (runs) {
    for (int64_t c = 0; c < C; ++c) ucol[c] = c * chan_stride;
    toff = toff_full;
  } else {
    for (int64_t c = 0; c < C; ++c)
      for (int64_t t = 0; t < kh * kw; ++t) ucol[c * kh * kw + t] = c * chan_stride + toff_full[t];
    toff.assign(1, 0);
  }
  // indices were range-checked when the layout was built; re-check cheaply against this input
  const int32_t* ip = idx.data_ptr<int32_t>();
  if (idx.numel() > 0) {
    int32_t lo = ip[0], hi = ip[0];
    for (int64_t i = 1; i < idx.numel(); ++i) {
      lo = ip[i] < lo ? ip[i] : lo;
      hi = ip[i] > hi ? ip[i] : hi;
    }
    TORCH_CHECK(lo >= 0 && hi < units, "cpu-1xn: input has ", C, " channels but the layout indexes unit ", hi);
  }
  const int64_t* rp = rowptr.data_ptr<int64_t>();
  TORCH_CHECK(rp[0] == 0 && rp[nbr] == idx.numel(), "cpu-1xn: rowptr does not cover idx");

  PkArgs a;
  a.x = xp;
  a.ucol = ucol.data();
  a.toff = toff.data();
  a.vals = vals.data_ptr<float>();
  a.idx = ip;
  a.rowptr = rp;
  a.out_row = out_row.data_ptr<int64_t>();
  // the layer's bias starts the accumulators; the epilogue's shift is added to the finished sum, then the
  // residual: the order (and rounding) of the unfused ops, so fused and unfused models agree bit for bit
  a.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  a.shift = shift.has_value() ? shift->data_ptr<float>() : nullptr;
  a.y = yconv;
  a.res = residual.has_value() ? residual->data_ptr<float>() : nullptr;
  a.act = (int32_t)act;
  a.tmask = nullptr;
  a.x_img_stride = C * chan_stride;
  a.y_img_stride = M * Hout * Wout;
  a.y_plane = Hout * Wout;
  a.pv = (Hout - 1) * wq + Wout;
  a.n = (int32_t)N;
  a.t = (int32_t)T;
  a.nbr = (int32_t)nbr;
  a.pt = isa == 512 ? pk_tile_avx512((int)N) : pk_tile_avx2((int)N);
  a.n_ptiles = (a.pv + a.pt - 1) / a.pt;
  // per-vector store masks (kept lanes and where they land) and, direct mode, per-tap load masks
  const int64_t W = isa == 512 ? 16 : 8;
  const int64_t nvec = a.n_ptiles * a.pt / W;
  const StoreMap& smap = store_map(a.pv, wq, Wout, W, nvec);
  a.vmask = smap.vmask.data();
  a.vbase = smap.vbase.data();
  a.nvec = nvec;
  std::vector<int32_t> utap;
  a.utap = nullptr;
  if (direct) {
    a.tmask = tap_mask(H, Wd, Hout, kh, kw, ph, pw, dh, dw, nvec).bits.data();
    if (!runs) {
      utap.resize(units);
      for (int64_t u = 0; u < units; ++u) utap[u] = (int32_t)(u % (kh * kw));
      a.utap = utap.data();
    }
  }
  const int64_t tiles = B * a.n_ptiles;
  // L2 budget for one chunk of activations: channels x phases x (chunk + halo) floats
  const int64_t per_pos = std::max<int64_t>(1, C * (as_is || direct ? 1 : chan_stride / std::max<int64_t>(1, (Hout + ((kh - 1) * dh) / sh) * wq)));
  a.chunk_tiles = std::max<int64_t>(1, (256 * 1024 / 4) / (per_pos * a.pt));
  a.nimg = B;
  const int64_t nthreads = at::get_num_threads();
  if (!direct && T == 1 && wq == Wout && a.pv == 1) {  // one position per image (GEMV): SIMD over the block's N rows
    at::parallel_for(0, nbr, 1, [&](int64_t b0, int64_t b1) {
      if (isa == 512) pk_gemv_avx512(a, b0, b1);
      else pk_gemv_avx2(a, b0, b1);
    });
    if (pool) planes_epilogue(yconv, y.data_ptr<float>(), B, M, Hout, Wout, nullptr, nullptr, 0, pool_k, pool_s, pool_p);
    return y;
  }
  auto run = [&](int64_t br0, int64_t br1, int64_t t0, int64_t t1) {
    if (isa == 512) pk_run_avx512(a, br0, br1, t0, t1);
    else pk_run_avx2(a, br0, br1, t0, t1);
  };
  if (nthreads <= 1) {
    run(0, nbr, 0, tiles);
  } else if (nbr >= 2 * nthreads || tiles < nthreads) {
    // split block-rows into ranges of equal kept-block count (equal work; SUBP rows: equal ranges)
    std::vector<int64_t> cut(nthreads + 1, nbr);
    cut[0] = 0;
    const int64_t total = rp[nbr];
    int64_t br = 0;
    for (int64_t p = 1; p < nthreads; ++p) {
      const int64_t goal = (total * p + nthreads - 1) / nthreads;
      while (br < nbr && rp[br] < goal) ++br;
      cut[p] = std::max(cut[p - 1], br);
    }
    if (total == 0)
      for (int64_t p = 0; p <= nthreads; ++p) cut[p] = nbr * p / nthreads;
    at::parallel_for(0, nthreads, 1, [&](int64_t p0, int64_t p1) {
      for (int64_t p = p0; p < p1; ++p)
        if (cut[p] < cut[p + 1]) run(cut[p], cut[p + 1], 0, tiles);
    });
  } else {
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) { run(0, nbr, t0, t1); });
  }
  if (pool) planes_epilogue(yconv, y.data_ptr<float>(), B, M, Hout, Wout, nullptr, nullptr, 0, pool_k, pool_s, pool_p);
  return y;
}

// The epilogue alone, for a dense conv's output (the dense fallback keeps its fused ops in one pass):
// y + shift (per channel) + residual, activation, then max pooling. Returns a new tensor.
at::Tensor epilogue(const at::Tensor& y, const std::optional<at::Tensor>& shift, const std::optional<at::Tensor>& residual,
                    int64_t act, int64_t pool_k, int64_t pool_s, int64_t pool_p) {
  TORCH_CHECK(y.device().is_cpu() && y.scalar_type() == at::kFloat && y.dim() == 4,
              "prunekit cpu-1xn epilogue: y must be a 4-D float32 CPU tensor");
  TORCH_CHECK(act >= 0 && act <= 2, "cpu-1xn: act must be 0 (none), 1 (relu) or 2 (relu6)");
  const at::Tensor yc = y.contiguous();
  const int64_t B = yc.size(0), C = yc.size(1), H = yc.size(2), Wd = yc.size(3);
  if (shift.has_value())
    TORCH_CHECK(shift->scalar_type() == at::kFloat && shift->is_contiguous() && shift->numel() == C, "cpu-1xn: bad shift");
  at::Tensor rc;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == yc.sizes() && residual->scalar_type() == at::kFloat, "cpu-1xn: bad residual");
    rc = residual->contiguous();
  }
  const float* sp = shift.has_value() ? shift->data_ptr<float>() : nullptr;
  const float* rp = residual.has_value() ? rc.data_ptr<float>() : nullptr;
  int64_t Ho = H, Wo = Wd;
  if (pool_k > 0) {
    TORCH_CHECK(pool_s >= 1 && pool_p >= 0 && 2 * pool_p <= pool_k && H + 2 * pool_p >= pool_k && Wd + 2 * pool_p >= pool_k,
                "cpu-1xn: bad max-pool geometry");
    Ho = (H + 2 * pool_p - pool_k) / pool_s + 1;
    Wo = (Wd + 2 * pool_p - pool_k) / pool_s + 1;
  }
  at::Tensor out = at::empty({B, C, Ho, Wo}, yc.options());
  planes_epilogue(yc.data_ptr<float>(), out.data_ptr<float>(), B, C, H, Wd, sp, rp, act, pool_k, pool_s, pool_p);
  return out;
}

int64_t isa() { return cpu_isa(); }

int64_t tile(int64_t n, int64_t which) {
  return which == 512 ? pk_tile_avx512((int)n) : pk_tile_avx2((int)n);
}

}  // namespace

// Schemas stated here, CPU kernels registered for the CPU key only: Python adds the fake (meta) kernels
// (ops.py), so torch.compile and torch.export trace through both ops.
TORCH_LIBRARY(prunekit_cpu1xn, m) {
  m.def("conv2d(Tensor x, Tensor vals, Tensor idx, Tensor rowptr, Tensor out_row, Tensor? bias, int M, int kh, "
        "int kw, int sh, int sw, int ph, int pw, int dh, int dw, bool runs, int isa, bool poison, Tensor? shift, "
        "Tensor? residual, int act, int pool_k, int pool_s, int pool_p) -> Tensor");
  m.def("epilogue(Tensor y, Tensor? shift, Tensor? residual, int act, int pool_k, int pool_s, int pool_p) -> Tensor");
  m.def("isa", &isa);
  m.def("tile", &tile);
}

TORCH_LIBRARY_IMPL(prunekit_cpu1xn, CPU, m) {
  m.impl("conv2d", &conv2d);
  m.impl("epilogue", &epilogue);
}
