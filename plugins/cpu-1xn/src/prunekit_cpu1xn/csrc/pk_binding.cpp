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

struct StoreMap {
  int64_t key[4] = {-1, -1, -1, -1};
  std::vector<uint32_t> vmask;
  std::vector<int64_t> vbase;
};

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

at::Tensor conv2d(const at::Tensor& x, const at::Tensor& vals, const at::Tensor& idx, const at::Tensor& rowptr,
                  const at::Tensor& out_row, const std::optional<at::Tensor>& bias, int64_t M, int64_t kh, int64_t kw,
                  int64_t sh, int64_t sw, int64_t ph, int64_t pw, int64_t dh, int64_t dw, bool runs, int64_t isa, bool poison) {
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
  const int64_t best = cpu_isa();
  if (isa == 0) isa = best;
  TORCH_CHECK((isa == 512 && best == 512) || (isa == 2 && best >= 2),
              "cpu-1xn: instruction set ", isa, " not available on this CPU (best: ", best, ")");

  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), Wd = x.size(3);
  const int64_t Hout = (H + 2 * ph - dh * (kh - 1) - 1) / sh + 1;
  const int64_t Wout = (Wd + 2 * pw - dw * (kw - 1) - 1) / sw + 1;
  TORCH_CHECK(H + 2 * ph >= dh * (kh - 1) + 1 && Wd + 2 * pw >= dw * (kw - 1) + 1 && Hout > 0 && Wout > 0,
              "cpu-1xn: input ", x.sizes(), " is smaller than the kernel");
  auto y = at::empty({B, M, Hout, Wout}, x.options());
  if (poison) y.fill_(std::numeric_limits<float>::quiet_NaN());  // tests: any unwritten element shows
  if (B == 0) return y;

  const bool as_is = kh == 1 && kw == 1 && sh == 1 && sw == 1 && ph == 0 && pw == 0;
  std::vector<int64_t> toff_full(kh * kw, 0);
  int64_t wq, chan_stride;
  const float* xp;
  if (as_is) {
    wq = Wd;
    chan_stride = H * Wd;
    xp = x.data_ptr<float>();
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
            const float* srow = src + row * Wd;
            for (int64_t jj = 0; jj < wq; ++jj) {
              const int64_t col = jj * sw + pb - pw;
              d[jj] = (col >= 0 && col < Wd) ? srow[col] : 0.0f;
            }
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
  a.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  a.y = y.data_ptr<float>();
  a.x_img_stride = C * chan_stride;
  a.y_img_stride = M * Hout * Wout;
  a.y_plane = Hout * Wout;
  a.pv = (Hout - 1) * wq + Wout;
  a.n = (int32_t)N;
  a.t = (int32_t)T;
  a.nbr = (int32_t)nbr;
  a.pt = isa == 512 ? pk_tile_avx512((int)N) : pk_tile_avx2((int)N);
  a.n_ptiles = (a.pv + a.pt - 1) / a.pt;
  // per-vector store masks: virtual position q is output (q / wq, q % wq) when q % wq < Wout. Built with
  // running counters (no division per lane) and kept per calling thread for the last geometry seen.
  const int64_t W = isa == 512 ? 16 : 8;
  const int64_t nvec = a.n_ptiles * a.pt / W;
  static thread_local StoreMap smap;
  const int64_t key[4] = {a.pv, wq, Wout, W};
  if (!std::equal(key, key + 4, smap.key) || (int64_t)smap.vmask.size() < nvec) {
    std::copy(key, key + 4, smap.key);
    smap.vmask.assign(nvec, 0);
    smap.vbase.assign(nvec, 0);
    int64_t oh = 0, ow = 0;  // coordinates of q
    for (int64_t v = 0; v < nvec; ++v) {
      smap.vbase[v] = oh * Wout + std::min(ow, Wout);
      uint32_t m = 0;
      for (int64_t l = 0; l < W; ++l) {
        if (v * W + l < a.pv && ow < Wout) m |= 1u << l;
        if (++ow == wq) {
          ow = 0;
          ++oh;
        }
      }
      smap.vmask[v] = m;
    }
  }
  const std::vector<uint32_t>& vmask = smap.vmask;
  const std::vector<int64_t>& vbase = smap.vbase;
  a.vmask = vmask.data();
  a.vbase = vbase.data();
  const int64_t tiles = B * a.n_ptiles;
  // L2 budget for one chunk of activations: channels x phases x (chunk + halo) floats
  const int64_t per_pos = std::max<int64_t>(1, C * (as_is ? 1 : chan_stride / std::max<int64_t>(1, (Hout + ((kh - 1) * dh) / sh) * wq)));
  a.chunk_tiles = std::max<int64_t>(1, (256 * 1024 / 4) / (per_pos * a.pt));
  a.nimg = B;
  const int64_t nthreads = at::get_num_threads();
  if (T == 1 && wq == Wout && a.pv == 1) {  // one position per image (GEMV): SIMD over the block's N rows
    at::parallel_for(0, nbr, 1, [&](int64_t b0, int64_t b1) {
      if (isa == 512) pk_gemv_avx512(a, b0, b1);
      else pk_gemv_avx2(a, b0, b1);
    });
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
  return y;
}

int64_t isa() { return cpu_isa(); }

int64_t tile(int64_t n, int64_t which) {
  return which == 512 ? pk_tile_avx512((int)n) : pk_tile_avx2((int)n);
}

}  // namespace

TORCH_LIBRARY(prunekit_cpu1xn, m) {
  m.def("conv2d", &conv2d);
  m.def("isa", &isa);
  m.def("tile", &tile);
}
