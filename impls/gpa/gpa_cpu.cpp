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
// Below -104, where e^x rounds to 0, x is clamped: the result is 0 or the least subnormal.
inline float exp_nonpositive(float x) {
  x = x < -104.0f ? -104.0f : x;
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
  return p * scale * 5.42101086242752217e-20f;  // 2^-64
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

// Phase 2. q [G, Nq, C], k [G, Nk, C], v [G, Nk, Cv]: row-major maps; keys [G, m, kappa].
// lse, if not null, is written cell-row-major, [cell_rows, G, cell_cols, side^2], as the
// backward pass (GridAttention in vectorised.py) reads it.
template <typename T>
void phase2(const T* q, const T* k, const T* v, const int64_t* keys, T* out, T* lse,
            int64_t groups, int64_t c, int64_t cv, int64_t d, int64_t side, int64_t wq,
            int64_t nq, int64_t wk, int64_t nk, int64_t cell_rows, int64_t cell_cols,
            int64_t topk, bool euclid, double scale) {
  const int64_t m = cell_rows * cell_cols;
  const int64_t queries = side * side;
  const int64_t n_keys = topk * d * d;
  const int64_t kw = wk / d;  // low-res keys per row
  const T factor = static_cast<T>(euclid ? 2 * scale : scale);
  at::parallel_for(0, groups * m, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> qb(queries * c), kb(n_keys * c), vb(n_keys * cv), sb(queries * n_keys),
        ob(queries * cv), top(queries), total(queries), knorm(euclid ? n_keys : 0);
    for (int64_t job = begin; job < end; ++job) {
      const int64_t g = job / m, cell = job % m;
      const int64_t row = cell / cell_cols, col = cell % cell_cols;
      const T* qg = q + g * nq * c;
      const T* kg = k + g * nk * c;
      const T* vg = v + g * nk * cv;
      const int64_t* kept = keys + (g * m + cell) * topk;
      for (int64_t a = 0; a < side; ++a) {  // queries: side rows of side tokens, scaled
        const T* src = qg + ((row * side + a) * wq + col * side) * c;
        T* dst = qb.data() + a * side * c;
#pragma omp simd
        for (int64_t i = 0; i < side * c; ++i) dst[i] = src[i] * factor;
      }
      for (int64_t j = 0; j < topk; ++j) {  // each kept block: d rows of d tokens
        const int64_t kr = kept[j] / kw, kc = kept[j] % kw;
        for (int64_t a = 0; a < d; ++a) {
          const int64_t token = (kr * d + a) * wk + kc * d;
          const int64_t slot = (j * d + a) * d;
          std::memcpy(kb.data() + slot * c, kg + token * c, sizeof(T) * d * c);
          std::memcpy(vb.data() + slot * cv, vg + token * cv, sizeof(T) * d * cv);
        }
      }
      if (euclid) {  // scale (2 q.k - |k|^2), with q pre-scaled by 2 scale
        for (int64_t j = 0; j < n_keys; ++j) {
          T* kj = kb.data() + j * c;
          T norm = 0;
#pragma omp simd reduction(+ : norm)
          for (int64_t i = 0; i < c; ++i) norm += kj[i] * kj[i];
          knorm[j] = static_cast<T>(scale) * norm;
          // An infinite |k|^2: zeroed channels make the score 0 - inf = -inf, as -|q - k|^2
          // is, instead of inf - inf = NaN (euclid_keys in vectorised.py).
          if (std::isinf(norm)) std::fill(kj, kj + c, T(0));
        }
      }
      gemm_abt(queries, n_keys, c, qb.data(), kb.data(), sb.data());
      if (euclid) {
        for (int64_t i = 0; i < queries; ++i) {
          T* x = sb.data() + i * n_keys;
#pragma omp simd
          for (int64_t j = 0; j < n_keys; ++j) x[j] -= knorm[j];
        }
      }
      exp_rows(sb.data(), queries, n_keys, top.data(), total.data());
      if (lse != nullptr) {
        T* cell_lse = lse + ((row * groups + g) * cell_cols + col) * queries;
        for (int64_t i = 0; i < queries; ++i) cell_lse[i] = top[i] + std::log(total[i]);
      }
      // O = e V with e unnormalised; each row is divided by its sum on its way to the output.
      gemm_ab(queries, cv, n_keys, sb.data(), vb.data(), ob.data());
      for (int64_t i = 0; i < queries; ++i) {
        const int64_t a = i / side, b = i % side;
        T* dst = out + (g * nq + (row * side + a) * wq + col * side + b) * cv;
        const T* src = ob.data() + i * cv;
        const T inv = T(1) / total[i];
#pragma omp simd
        for (int64_t j = 0; j < cv; ++j) dst[j] = src[j] * inv;
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

// Phase 2: out [G, Nq, Cv] and, if with_lse, each query's log-sum-exp as
// [cell_rows, G * cell_cols * side^2, 1] (else an empty tensor).
std::vector<torch::Tensor> attend(torch::Tensor q, torch::Tensor k, torch::Tensor v,
                                  torch::Tensor keys, int64_t d, int64_t side, int64_t wq,
                                  int64_t wk, bool euclid, double scale, bool with_lse) {
  check_inputs({q, k, v, keys});
  TORCH_CHECK(keys.scalar_type() == torch::kLong, "gpa.cpp: keys must be int64");
  const int64_t groups = q.size(0), nq = q.size(1), c = q.size(2);
  const int64_t nk = k.size(1), cv = v.size(2), topk = keys.size(2);
  const int64_t cell_cols = wq / side, cell_rows = nq / wq / side;
  const int64_t nk_low = (nk / wk / d) * (wk / d);
  TORCH_CHECK(keys.numel() == 0 || (keys.min().item<int64_t>() >= 0 &&
                                    keys.max().item<int64_t>() < nk_low),
              "gpa.cpp: keys must index the ", nk_low, " low-res keys");
  auto out = torch::empty({groups, nq, cv}, q.options());
  advise_huge_pages(out);
  auto lse = torch::empty({with_lse ? cell_rows : 0, groups * cell_cols * side * side, 1},
                          q.options());
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "gpa_cpu_attend", [&] {
    phase2<scalar_t>(q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                     keys.data_ptr<int64_t>(), out.data_ptr<scalar_t>(),
                     with_lse ? lse.data_ptr<scalar_t>() : nullptr, groups, c, cv, d, side, wq,
                     nq, wk, nk, cell_rows, cell_cols, topk, euclid, scale);
  });
  return {out, lse};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("select_keys", &select_keys, "GPA phase 1: the top-kappa low-res keys of each cell");
  m.def("attend", &attend, "GPA phase 2, fused per query cell");
}
