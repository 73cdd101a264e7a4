// Grid Partitioned Attention on the CPU: both phases as fused C++ loops over query cells
// (Jetchev et al. 2021, arXiv 2107.03742; the steps are in attnbench/impls/gpa/common.py).
//
// The parallel jobs are query cells, whose working sets stay in the core's L2 cache, and the
// matmuls go to the BLAS PyTorch links (the Fortran sgemm_/dgemm_ that libtorch_cpu exports;
// called inside a parallel region it runs single-threaded, one job per thread, and outside one
// on every thread).
//
// - Phase 1 (select_keys): per band of query cells, one matmul gives their low-res scores
//   against every low-res key; then a job per cell takes the softmax of its rows, sums them
//   into each key's relevance and keeps its top-kappa keys.
// - Phase 2 (attend): a job is one query cell; it copies the cell's queries and the kept
//   d x d blocks of keys and values, computes S = Q K^T, its softmax and O = P V, and writes
//   O's rows straight into the row-major output. Nothing of size m kappa d^2 C is made.
//
// Sizes are checked by the caller (attnbench/impls/gpa/common.py, geometry); here only the
// tensors' device, layout and the key indices.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*,
            const float*, const int*, const float*, const int*, const float*, float*,
            const int*);
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*,
            const double*, const int*, const double*, const int*, const double*, double*,
            const int*);
}

namespace {

// Row-major C[m x n] = A[m x k] B^T (B is n x k, row-major): column-major C^T = B A^T.
void gemm_abt(int m, int n, int k, const float* a, const float* b, float* c) {
  const float one = 1.0f, zero = 0.0f;
  sgemm_("T", "N", &n, &m, &k, &one, b, &k, a, &k, &zero, c, &n);
}
void gemm_abt(int m, int n, int k, const double* a, const double* b, double* c) {
  const double one = 1.0, zero = 0.0;
  dgemm_("T", "N", &n, &m, &k, &one, b, &k, a, &k, &zero, c, &n);
}

// Row-major C[m x n] = A^T B (A is k x m, B is k x n, row-major): column-major C^T = B^T A.
void gemm_atb(int m, int n, int k, const float* a, const float* b, float* c) {
  const float one = 1.0f, zero = 0.0f;
  sgemm_("N", "T", &n, &m, &k, &one, b, &n, a, &m, &zero, c, &n);
}
void gemm_atb(int m, int n, int k, const double* a, const double* b, double* c) {
  const double one = 1.0, zero = 0.0;
  dgemm_("N", "T", &n, &m, &k, &one, b, &n, a, &m, &zero, c, &n);
}

// Row-major C[m x n] = A[m x k] B (B is k x n, row-major): column-major C^T = B^T A^T.
void gemm_ab(int m, int n, int k, const float* a, const float* b, float* c) {
  const float one = 1.0f, zero = 0.0f;
  sgemm_("N", "N", &n, &m, &k, &one, b, &n, a, &k, &zero, c, &n);
}
void gemm_ab(int m, int n, int k, const double* a, const double* b, double* c) {
  const double one = 1.0, zero = 0.0;
  dgemm_("N", "N", &n, &m, &k, &one, b, &n, a, &k, &zero, c, &n);
}

// e^x for x <= 0 (a softmax argument once the row maximum is subtracted), in branch-free
// arithmetic the compiler vectorises: x = n ln2 + r with n rounded by the 1.5 * 2^23 trick
// (Cody-Waite, ln2 split in two), Cephes' degree-7 polynomial for e^r (relative error ~1e-7,
// float's own), then 2^n applied as 2^(n + 64), written into the exponent bits, times 2^-64:
// exact for normal results, one rounding for subnormal ones (below e^-87.3), as std::exp.
// Below -104, where e^x rounds to 0 (e^-104 is under half the least subnormal), the result is
// 0 (x is clamped first, so that 2^n stays in range).
inline float exp_nonpositive(float arg) {
  const float x = arg < -104.0f ? -104.0f : arg;
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 64 + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return arg < -104.0f ? 0.0f : p * scale * 5.42101086242752217e-20f;  // 2^-64
}
inline double exp_nonpositive(double x) { return std::exp(x); }

// e^(x - max) of each row of s [rows x n], in place; each row's max and sum into top, total.
template <typename T>
void exp_rows(T* s, int64_t rows, int64_t n, T* top, T* total) {
  for (int64_t i = 0; i < rows; ++i) {
    T* x = s + i * n;
    T high = x[0];
#pragma omp simd reduction(max : high)
    for (int64_t j = 1; j < n; ++j) high = x[j] > high ? x[j] : high;
    T sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t j = 0; j < n; ++j) {
      x[j] = exp_nonpositive(x[j] - high);
      sum += x[j];
    }
    top[i] = high;
    total[i] = sum;
  }
}

// The largest values of x[0..n), folded: x read as the rows of a [n / width, width] grid,
// out[j] = the maximum of column j (width <= n).
template <typename T>
void column_max(const T* x, int64_t n, int64_t width, T* out) {
  std::copy(x, x + width, out);
  for (int64_t r = width; r < n; r += width) {
    const int64_t len = std::min(width, n - r);
#pragma omp simd
    for (int64_t j = 0; j < len; ++j) out[j] = x[r + j] > out[j] ? x[r + j] : out[j];
  }
}

// Orders values from the largest down, NaN first (as torch.topk ranks it), ties by index.
template <typename T>
bool ranks_before(const std::pair<T, int64_t>& a, const std::pair<T, int64_t>& b) {
  const bool a_nan = std::isnan(a.first), b_nan = std::isnan(b.first);
  if (a_nan != b_nan) return a_nan;
  if (!a_nan && a.first != b.first) return a.first > b.first;
  return a.second < b.second;
}

// The `topk` largest of rel[0..n), ties to the lower index, as ascending indices into `out`
// (and their values into `kept`, if given). Each column maximum of rel read as a grid is one
// of its values, so the topk-th largest of any topk such maxima is a lower bound t of the
// topk-th largest value: only values >= t in columns whose maximum reaches t are candidates.
// t comes from 256 column maxima folded again into 16 (a vectorised pass and a sort of 16),
// or where 16 < topk <= 256 from the 256 themselves; for a larger topk, or where NaN leaves
// fewer than topk candidates, every value is one. `work` holds 512 entries.
template <typename T>
void top_keys(const T* rel, int64_t n, int64_t topk, int64_t* out, T* kept, std::vector<T>& work,
              std::vector<std::pair<T, int64_t>>& candidates) {
  const int64_t width = std::min<int64_t>(n, 256), width2 = std::min<int64_t>(width, 16);
  T* maxima = work.data();
  T* maxima2 = work.data() + width;
  auto nan_first = [](T a, T b) { return std::isnan(a) ? !std::isnan(b) : a > b; };
  column_max(rel, n, width, maxima);
  candidates.clear();
  if (topk <= width) {
    T threshold;
    if (topk <= width2) {
      column_max(maxima, width, width2, maxima2);
      std::sort(maxima2, maxima2 + width2, nan_first);
      threshold = maxima2[topk - 1];
    } else {
      std::copy(maxima, maxima + width, maxima2);
      std::nth_element(maxima2, maxima2 + topk - 1, maxima2 + width, nan_first);
      threshold = maxima2[topk - 1];
    }
    for (int64_t j = 0; j < width; ++j) {
      if (!(maxima[j] >= threshold)) continue;
      for (int64_t i = j; i < n; i += width) {
        if (rel[i] >= threshold) candidates.emplace_back(rel[i], i);
      }
    }
  }
  if (static_cast<int64_t>(candidates.size()) < topk) {
    candidates.clear();
    for (int64_t i = 0; i < n; ++i) candidates.emplace_back(rel[i], i);
  }
  std::partial_sort(candidates.begin(), candidates.begin() + topk, candidates.end(),
                    ranks_before<T>);
  std::sort(candidates.begin(), candidates.begin() + topk,
            [](const auto& a, const auto& b) { return a.second < b.second; });
  for (int64_t i = 0; i < topk; ++i) {
    out[i] = candidates[i].second;
    if (kept != nullptr) kept[i] = candidates[i].first;
  }
}

// A fresh output of many pages: ask for transparent huge pages (Linux, where THP is set to
// "madvise"). First touch of a 4 KiB page costs a fault each; at 256 x 256 x 160 floats that
// is 10240 faults, about as long as the writes themselves.
void advise_huge_pages(torch::Tensor& t) {
#ifdef __linux__
  const int64_t huge = 2 << 20;
  const int64_t bytes = t.numel() * t.element_size();
  if (bytes < 2 * huge) return;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + huge - 1) / huge * huge;
  const uintptr_t last = (begin + bytes) / huge * huge;
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);
#else
  (void)t;
#endif
}

// Phase 1. q_cells [G, m s2, C]: pooled queries, cell-major (a cell's s2 rows adjacent) and
// pre-scaled; k_low [G, nk, C]; bias [G, nk] added to every score (euclid) or null; scores: a
// buffer of band_cells s2 nk. Per band of cells, one matmul on every thread makes the band's
// scores (jobs of a few cells would each pack all the keys again: slower), then a parallel
// loop over its cells takes each row's softmax, sums the cell's rows into the relevance of
// every key (the softmax's division folded into the sum) and keeps the top kappa.
template <typename T>
void phase1(const T* q_cells, const T* k_low, const T* bias, int64_t* keys, T* kept,
            T* scores, int64_t groups, int64_t m, int64_t s2, int64_t nk, int64_t c,
            int64_t topk, int64_t band_cells) {
  for (int64_t g = 0; g < groups; ++g) {
    for (int64_t first = 0; first < m; first += band_cells) {
      const int64_t cells = std::min(band_cells, m - first);
      gemm_abt(cells * s2, nk, c, q_cells + (g * m + first) * s2 * c, k_low + g * nk * c,
               scores);
      at::parallel_for(0, cells, 1, [&](int64_t begin, int64_t end) {
        std::vector<T> relevance(nk), e(nk), work(512);
        const T* b = bias == nullptr ? nullptr : bias + g * nk;
        std::vector<std::pair<T, int64_t>> candidates;
        for (int64_t cell = begin; cell < end; ++cell) {
          std::fill(relevance.begin(), relevance.end(), T(0));
          // e: one row, in L1. Not exp_rows: out of place through it (x and e possibly
          // aliased) this loop ran 2.4x slower.
          for (int64_t i = 0; i < s2; ++i) {
            T* x = scores + (cell * s2 + i) * nk;
            if (b != nullptr) {
#pragma omp simd
              for (int64_t j = 0; j < nk; ++j) x[j] += b[j];
            }
            T high = x[0];
#pragma omp simd reduction(max : high)
            for (int64_t j = 1; j < nk; ++j) high = x[j] > high ? x[j] : high;
            T sum = 0;
#pragma omp simd reduction(+ : sum)
            for (int64_t j = 0; j < nk; ++j) {
              e[j] = exp_nonpositive(x[j] - high);
              sum += e[j];
            }
            const T inv = T(1) / sum;
#pragma omp simd
            for (int64_t j = 0; j < nk; ++j) relevance[j] += e[j] * inv;
          }
          const int64_t at = (g * m + first + cell) * topk;
          top_keys(relevance.data(), nk, topk, keys + at, kept == nullptr ? nullptr : kept + at,
                   work, candidates);
        }
      });
    }
  }
}

// Phase 2's layout. q [G, Nq, C], k [G, Nk, C], v [G, Nk, Cv]: row-major maps of widths wq and
// wk; keys [G, m, kappa]: the low-res keys each query cell keeps. A job is one query cell:
// side rows of side query tokens, and kappa blocks of d rows of d key tokens.
struct Layout {
  int64_t groups, c, cv, d, side, wq, nq, wk, nk, cell_rows, cell_cols, topk;
  int64_t cells() const { return cell_rows * cell_cols; }
  int64_t queries() const { return side * side; }
  int64_t n_keys() const { return topk * d * d; }
  int64_t low_res_keys() const { return (nk / wk / d) * (wk / d); }
  // The first token of row a of query cell `cell`.
  int64_t query_token(int64_t cell, int64_t a) const {
    return ((cell / cell_cols) * side + a) * wq + (cell % cell_cols) * side;
  }
  // The first token of row a of low-res key `block`'s d x d block.
  int64_t key_token(int64_t block, int64_t a) const {
    const int64_t kw = wk / d;
    return ((block / kw) * d + a) * wk + (block % kw) * d;
  }
  // Where query i of cell `cell` of group g finds its log-sum-exp: [cell_rows, G, cell_cols,
  // side^2], as the backward pass in pytorch.py (GridAttention) reads it.
  int64_t lse_offset(int64_t g, int64_t cell) const {
    return (((cell / cell_cols) * groups + g) * cell_cols + cell % cell_cols) * queries();
  }
};

// A query cell's rows of x [Nq, width] (one group's map), times factor, into dst [side^2, width].
template <typename T>
void gather_cell(const T* x, const Layout& p, int64_t cell, int64_t width, T factor, T* dst) {
  for (int64_t a = 0; a < p.side; ++a) {
    const T* src = x + p.query_token(cell, a) * width;
    T* row = dst + a * p.side * width;
#pragma omp simd
    for (int64_t i = 0; i < p.side * width; ++i) row[i] = src[i] * factor;
  }
}

// The kept blocks of keys kg [Nk, C] and values vg [Nk, Cv] (one group's maps) into kb
// [kappa d^2, C] and vb [kappa d^2, Cv], block after block, each d rows of d tokens.
template <typename T>
void gather_blocks(const T* kg, const T* vg, const int64_t* kept, const Layout& p, T* kb, T* vb) {
  const int64_t d = p.d;
  for (int64_t j = 0; j < p.topk; ++j) {
    for (int64_t a = 0; a < d; ++a) {
      const int64_t token = p.key_token(kept[j], a);
      const int64_t slot = (j * d + a) * d;
      std::memcpy(kb + slot * p.c, kg + token * p.c, sizeof(T) * d * p.c);
      std::memcpy(vb + slot * p.cv, vg + token * p.cv, sizeof(T) * d * p.cv);
    }
  }
}

// The scores S [side^2, kappa d^2] of queries qb (pre-scaled) against keys kb. Dot: qb kb^T.
// Euclid, with qb pre-scaled by 2 scale: scale (2 q.k - |k|^2) = qb kb^T - knorm, knorm =
// scale |k|^2 per key; a key whose |k|^2 is infinite has its channels in kb zeroed, so that its
// score is 0 - inf = -inf, as -|q - k|^2 is, instead of inf - inf = NaN (euclid_keys in
// pytorch.py).
template <typename T>
void cell_scores(const T* qb, T* kb, T* knorm, const Layout& p, bool euclid, double scale, T* sb) {
  const int64_t queries = p.queries(), n_keys = p.n_keys(), c = p.c;
  if (euclid) {
    for (int64_t j = 0; j < n_keys; ++j) {
      T* kj = kb + j * c;
      T norm = 0;
#pragma omp simd reduction(+ : norm)
      for (int64_t i = 0; i < c; ++i) norm += kj[i] * kj[i];
      knorm[j] = static_cast<T>(scale) * norm;
      if (std::isinf(norm)) std::fill(kj, kj + c, T(0));
    }
  }
  gemm_abt(queries, n_keys, c, qb, kb, sb);
  if (euclid) {
    for (int64_t i = 0; i < queries; ++i) {
      T* x = sb + i * n_keys;
#pragma omp simd
      for (int64_t j = 0; j < n_keys; ++j) x[j] -= knorm[j];
    }
  }
}

// Phase 2: out [G, Nq, Cv], and each query's log-sum-exp into lse (Layout::lse_offset) if not
// null.
template <typename T>
void phase2(const T* q, const T* k, const T* v, const int64_t* keys, T* out, T* lse,
            const Layout& p, bool euclid, double scale) {
  const int64_t m = p.cells(), queries = p.queries(), n_keys = p.n_keys();
  const int64_t c = p.c, cv = p.cv;
  const T factor = static_cast<T>(euclid ? 2 * scale : scale);
  at::parallel_for(0, p.groups * m, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> qb(queries * c), kb(n_keys * c), vb(n_keys * cv), sb(queries * n_keys),
        ob(queries * cv), top(queries), total(queries), knorm(euclid ? n_keys : 0);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t g = job / m, cell = job % m;
      gather_cell(q + g * p.nq * c, p, cell, c, factor, qb.data());
      gather_blocks(k + g * p.nk * c, v + g * p.nk * cv, keys + job * p.topk, p, kb.data(),
                    vb.data());
      cell_scores(qb.data(), kb.data(), knorm.data(), p, euclid, scale, sb.data());
      exp_rows(sb.data(), queries, n_keys, top.data(), total.data());
      if (lse != nullptr) {
        T* cell_lse = lse + p.lse_offset(g, cell);
        for (int64_t i = 0; i < queries; ++i) cell_lse[i] = top[i] + std::log(total[i]);
      }
      // O = e V with e unnormalised; each row is divided by its sum on its way to the output.
      gemm_ab(queries, cv, n_keys, sb.data(), vb.data(), ob.data());
      for (int64_t i = 0; i < queries; ++i) {
        const int64_t a = i / p.side, b = i % p.side;
        T* dst = out + (g * p.nq + p.query_token(cell, a) + b) * cv;
        const T* src = ob.data() + i * cv;
        const T inv = T(1) / total[i];
#pragma omp simd
        for (int64_t j = 0; j < cv; ++j) dst[j] = src[j] * inv;
      }
    }
  });
}

// dst[0..n) += src[0..n).
template <typename T>
inline void add_to(T* dst, const T* src, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] += src[i];
}

// Phase 2's backward pass: dq [G, Nq, C], and dk [G, Nk, C], dv [G, Nk, Cv] zero-filled by the
// caller. Per query cell, with its queries, kept blocks and output gradient dO in buffers:
// P = exp(S - lse) recomputed from the forward's log-sum-exp, dV = P^T dO, dP = dO V^T,
// dS = P (dP - rowsum(dO O)), dQ = factor dS K, dK = dS^T q_s (euclid: - 2 scale k colsum(dS)
// too, from the -scale |k|^2 term), each by one BLAS call.
//
// dK and dV are sums over every cell that keeps a block. The cells are cut into one contiguous
// range per worker (a job of the parallel loop; as many as threads): worker 0 adds its cells'
// shares straight into dk and dv, each other worker into tiles of its own (a d x d block of
// keys and values each) for just the blocks its cells keep, and a last parallel loop over the
// blocks adds those tiles in worker order. No two threads write the same memory, and the sums
// come out the same on every run with the same number of threads.
template <typename T>
void phase2_backward(const T* q, const T* k, const T* v, const int64_t* keys, const T* out,
                     const T* lse, const T* dout, T* dq, T* dk, T* dv, const Layout& p,
                     bool euclid, double scale) {
  const int64_t m = p.cells(), jobs = p.groups * m, queries = p.queries(), n_keys = p.n_keys();
  const int64_t c = p.c, cv = p.cv, d = p.d, nk_low = p.low_res_keys();
  const int64_t blocks = p.groups * nk_low, tile = d * d * (c + cv);
  const T factor = static_cast<T>(euclid ? 2 * scale : scale);
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), jobs));
  // slots[w][block]: where worker w's tile of a block lies in tiles[w] (-1: none), w >= 1.
  std::vector<std::vector<int64_t>> slots(workers);
  std::vector<std::vector<T>> tiles(workers);
  at::parallel_for(0, workers, 1, [&](int64_t w_begin, int64_t w_end) {
    std::vector<T> qb(queries * c), kb(n_keys * c), vb(n_keys * cv), dob(queries * cv),
        sb(queries * n_keys), dsb(queries * n_keys), dqb(queries * c), dkb(n_keys * c),
        dvb(n_keys * cv), ob(queries * cv), delta(queries), knorm(euclid ? n_keys : 0),
        colsum(n_keys);
    for (int64_t w = w_begin; w < w_end; ++w) {
      const int64_t first = jobs * w / workers, last = jobs * (w + 1) / workers;
      if (w > 0) {
        std::vector<int64_t>& slot = slots[w];
        slot.assign(blocks, -1);
        int64_t used = 0;
        for (int64_t job = first; job < last; ++job) {
          const int64_t g = job / m;
          for (int64_t j = 0; j < p.topk; ++j) {
            int64_t& s = slot[g * nk_low + keys[job * p.topk + j]];
            if (s < 0) s = used++;
          }
        }
        tiles[w].assign(used * tile, T(0));
      }
      for (int64_t job = first; job < last; ++job) {
        const int64_t g = job / m, cell = job % m;
        const int64_t* kept = keys + job * p.topk;
        gather_cell(q + g * p.nq * c, p, cell, c, factor, qb.data());
        gather_blocks(k + g * p.nk * c, v + g * p.nk * cv, kept, p, kb.data(), vb.data());
        gather_cell(dout + g * p.nq * cv, p, cell, cv, T(1), dob.data());
        gather_cell(out + g * p.nq * cv, p, cell, cv, T(1), ob.data());
        for (int64_t i = 0; i < queries; ++i) {
          const T* o = ob.data() + i * cv;
          const T* g_o = dob.data() + i * cv;
          T sum = 0;
#pragma omp simd reduction(+ : sum)
          for (int64_t j = 0; j < cv; ++j) sum += o[j] * g_o[j];
          delta[i] = sum;
        }
        cell_scores(qb.data(), kb.data(), knorm.data(), p, euclid, scale, sb.data());
        const T* cell_lse = lse + p.lse_offset(g, cell);
        for (int64_t i = 0; i < queries; ++i) {
          T* x = sb.data() + i * n_keys;
          const T top = cell_lse[i];
#pragma omp simd
          for (int64_t j = 0; j < n_keys; ++j) x[j] = exp_nonpositive(x[j] - top);
        }
        gemm_atb(n_keys, cv, queries, sb.data(), dob.data(), dvb.data());
        gemm_abt(queries, n_keys, cv, dob.data(), vb.data(), dsb.data());
        for (int64_t i = 0; i < queries; ++i) {
          T* ds = dsb.data() + i * n_keys;
          const T* pr = sb.data() + i * n_keys;
          const T di = delta[i];
#pragma omp simd
          for (int64_t j = 0; j < n_keys; ++j) ds[j] = pr[j] * (ds[j] - di);
        }
        gemm_ab(queries, c, n_keys, dsb.data(), kb.data(), dqb.data());
        for (int64_t a = 0; a < p.side; ++a) {
          T* dst = dq + (g * p.nq + p.query_token(cell, a)) * c;
          const T* src = dqb.data() + a * p.side * c;
#pragma omp simd
          for (int64_t i = 0; i < p.side * c; ++i) dst[i] = src[i] * factor;
        }
        gemm_atb(n_keys, c, queries, dsb.data(), qb.data(), dkb.data());
        if (euclid) {
          std::fill(colsum.begin(), colsum.end(), T(0));
          for (int64_t i = 0; i < queries; ++i) add_to(colsum.data(), dsb.data() + i * n_keys,
                                                        n_keys);
          for (int64_t j = 0; j < n_keys; ++j) {
            const T w_j = static_cast<T>(2 * scale) * colsum[j];
            T* dkj = dkb.data() + j * c;
            const T* kj = kb.data() + j * c;
#pragma omp simd
            for (int64_t i = 0; i < c; ++i) dkj[i] -= w_j * kj[i];
          }
        }
        for (int64_t j = 0; j < p.topk; ++j) {
          T* own = w > 0 ? tiles[w].data() + slots[w][g * nk_low + kept[j]] * tile : nullptr;
          for (int64_t a = 0; a < d; ++a) {
            const int64_t slot = (j * d + a) * d;
            const int64_t token = g * p.nk + p.key_token(kept[j], a);
            T* to_k = own != nullptr ? own + a * d * c : dk + token * c;
            T* to_v = own != nullptr ? own + d * d * c + a * d * cv : dv + token * cv;
            add_to(to_k, dkb.data() + slot * c, d * c);
            add_to(to_v, dvb.data() + slot * cv, d * cv);
          }
        }
      }
    }
  });
  if (workers == 1) return;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t g = block / nk_low, low = block % nk_low;
      for (int64_t w = 1; w < workers; ++w) {
        const int64_t s = slots[w][block];
        if (s < 0) continue;
        const T* own = tiles[w].data() + s * tile;
        for (int64_t a = 0; a < d; ++a) {
          const int64_t token = g * p.nk + p.key_token(low, a);
          add_to(dk + token * c, own + a * d * c, d * c);
          add_to(dv + token * cv, own + d * d * c + a * d * cv, d * cv);
        }
      }
    }
  });
}

void check_inputs(const std::vector<torch::Tensor>& tensors) {
  for (const auto& t : tensors) {
    TORCH_CHECK(t.device().is_cpu(), "gpa.cpp: tensors must be on the CPU");
    TORCH_CHECK(t.is_contiguous(), "gpa.cpp: tensors must be contiguous");
  }
}

}  // namespace

// Phase 1: keys [G, m, kappa] (int64, ascending) and, if with_relevance, their relevances.
// Bands of about band_scores scores (one cell at least).
std::vector<torch::Tensor> select_keys(torch::Tensor q_cells, torch::Tensor k_low,
                                       torch::optional<torch::Tensor> bias, int64_t s2,
                                       int64_t topk, bool with_relevance, int64_t band_scores) {
  check_inputs({q_cells, k_low});
  if (bias) check_inputs({*bias});
  const int64_t groups = q_cells.size(0), c = q_cells.size(2), nk = k_low.size(1);
  const int64_t m = q_cells.size(1) / s2;
  const int64_t band_cells = std::min(m, std::max<int64_t>(1, band_scores / (s2 * nk)));
  auto scores = torch::empty({band_cells * s2 * nk}, q_cells.options());
  auto keys = torch::empty({groups, m, topk}, q_cells.options().dtype(torch::kLong));
  auto kept = torch::empty({with_relevance ? groups : 0, m, topk}, q_cells.options());
  AT_DISPATCH_FLOATING_TYPES(q_cells.scalar_type(), "gpa_cpu_select_keys", [&] {
    phase1<scalar_t>(q_cells.data_ptr<scalar_t>(), k_low.data_ptr<scalar_t>(),
                     bias ? bias->data_ptr<scalar_t>() : nullptr, keys.data_ptr<int64_t>(),
                     with_relevance ? kept.data_ptr<scalar_t>() : nullptr,
                     scores.data_ptr<scalar_t>(), groups, m, s2, nk, c, topk, band_cells);
  });
  return {keys, kept};
}

// Phase 2's layout from its tensors; checks the key indices.
Layout layout(const torch::Tensor& q, const torch::Tensor& k, const torch::Tensor& v,
              const torch::Tensor& keys, int64_t d, int64_t side, int64_t wq, int64_t wk) {
  check_inputs({q, k, v, keys});
  TORCH_CHECK(keys.scalar_type() == torch::kLong, "gpa.cpp: keys must be int64");
  const int64_t nq = q.size(1), nk = k.size(1);
  const Layout p{q.size(0), q.size(2), v.size(2), d, side, wq, nq, wk, nk,
                 nq / wq / side, wq / side, keys.size(2)};
  TORCH_CHECK(keys.numel() == 0 || (keys.min().item<int64_t>() >= 0 &&
                                    keys.max().item<int64_t>() < p.low_res_keys()),
              "gpa.cpp: keys must index the ", p.low_res_keys(), " low-res keys");
  return p;
}

// Phase 2: out [G, Nq, Cv] and, if with_lse, each query's log-sum-exp as
// [cell_rows, G * cell_cols * side^2, 1] (else an empty tensor).
std::vector<torch::Tensor> attend(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                  torch::Tensor keys, int64_t d, int64_t side, int64_t wq,
                                  int64_t wk, bool euclid, double scale, bool with_lse) {
  const Layout p = layout(q, k, v, keys, d, side, wq, wk);
  auto out = torch::empty({p.groups, p.nq, p.cv}, q.options());
  advise_huge_pages(out);
  auto lse = torch::empty({with_lse ? p.cell_rows : 0, p.groups * p.cell_cols * p.queries(), 1},
                          q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "gpa_cpu_attend", [&] {
    phase2<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                     keys.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
                     with_lse ? lse.data_ptr<scalar_t>() : nullptr, p, euclid, scale);
  });
  return {out, lse};
}

// Phase 2's gradients {dq, dk, dv} from the forward's inputs, output and log-sum-exp (attend
// with with_lse) and the output's gradient grad_out [G, Nq, Cv].
std::vector<torch::Tensor> attend_backward(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                           torch::Tensor keys, torch::Tensor out,
                                           torch::Tensor lse, torch::Tensor grad_out, int64_t d,
                                           int64_t side, int64_t wq, int64_t wk, bool euclid,
                                           double scale) {
  const Layout p = layout(q, k, v, keys, d, side, wq, wk);
  check_inputs({out, lse, grad_out});
  TORCH_CHECK(lse.numel() == p.groups * p.nq, "gpa.cpp: lse must hold one value per query");
  auto dq = torch::empty_like(q);
  auto dk = torch::zeros_like(k);
  auto dv = torch::zeros_like(v);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "gpa_cpu_attend_backward", [&] {
    phase2_backward<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                              v.data_ptr<scalar_t>(), keys.data_ptr<int64_t>(),
                              out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                              grad_out.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(),
                              dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), p, euclid,
                              scale);
  });
  return {dq, dk, dv};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("select_keys", &select_keys, "GPA phase 1: the top-kappa low-res keys of each cell");
  m.def("attend", &attend, "GPA phase 2, fused per query cell");
  m.def("attend_backward", &attend_backward, "GPA phase 2's gradients, fused per query cell");
}
