// CPU kernels of SLRLinear's runtime (hf_slr/runtime): y = x (S + U V)^T + b with S read in its
// compact form, never as a dense matrix.
//
// The form ("masked rows", prepared once by hf_slr/runtime/forms.py):
//   values    [nnz]          the stored values of S, row-major (SLRLinear.sparse_values, zero-copy);
//   mask      [out, words]   int64 words, the support of S, 1 bit per element, bit c of row o at
//                            word c / 64, bit c % 64 (rows padded to whole words; for an unstructured
//                            S with in % 64 == 0 this *is* the checkpoint's sparse_mask);
//   row_start [out + 1]      int64, index in `values` of each row's first stored value.
// N:M and unstructured S share it: N:M positions become the same 1-bit mask at preparation.
//
// Design. Decoding (few tokens) is memory bound: a dense fp32 weight costs 4 bytes per element,
// this form 2.125 at 50% (values + mask bit). Each row is walked in chunks of 16 columns (AVX-512)
// or 8 (AVX2): the chunk's mask bits say how many values it holds (popcount); those values are
// loaded contiguously and *expanded* into their lanes (vexpandps / a permutation table), then
// multiplied with the input's matching 16 columns for every token (one FMA per token and chunk,
// accumulators in registers). So the arithmetic runs at dense SIMD width while memory traffic is
// the compact one, and no index is ever decoded element by element. The low-rank branch is fused:
// z = x V^T (one thin GEMM, ATen) is computed first, then each row adds U[o, :] . z[t, :] in the
// same accumulators before the horizontal sum. Rows are split across threads (at::parallel_for);
// tokens are processed in blocks of up to 8 so a row's compact data is reused from L1 across the
// block. For long inputs (prefill) `masked_rows_prefill` instead expands S, block of rows by block,
// into a cache-sized dense buffer (same chunk walk) and calls one GEMM per block.
//
// Portability: compiled with -O3 and no -march flag; the AVX-512 and AVX2 variants carry GCC/Clang
// target attributes and are chosen at run time with __builtin_cpu_supports, a plain C++ variant
// (bit scan per stored value) serves every other CPU.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define SLR_X86 1
#include <immintrin.h>
#endif

namespace {

enum Isa { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

struct Problem {
  int64_t tokens, in, out, words, rank;
  int64_t chunk_values;     // N:M whose M divides the chunk width: values per chunk; else 0
  const float* x;           // [tokens, in] fp32
  const void* values;       // [nnz] in the value dtype
  int64_t nnz;
  const uint64_t* mask;     // [out, words]
  const int64_t* row_start; // [out + 1]
  const void* U;            // [out, rank] value dtype
  const float* z;           // [tokens, rank] fp32 (x V^T)
  const void* bias;         // [out] value dtype or nullptr
  float* y;                 // [tokens, out] fp32
};

template <typename V>
inline float to_float(V v) { return static_cast<float>(v); }

inline uint64_t load_word(const uint64_t* p) {
  uint64_t w;
  std::memcpy(&w, p, sizeof(w));
  return w;
}

// ---------------------------------------------------------------- portable C++ (any CPU)

template <typename V, int TB>
void rows_scalar(const Problem& p, int64_t o0, int64_t o1, int64_t t0) {
  const V* values = static_cast<const V*>(p.values);
  const V* U = static_cast<const V*>(p.U);
  const V* bias = static_cast<const V*>(p.bias);
  for (int64_t o = o0; o < o1; ++o) {
    float acc[TB] = {};
    const V* v = values + p.row_start[o];
    for (int64_t w = 0; w < p.words; ++w) {
      uint64_t bits = load_word(p.mask + o * p.words + w);
      while (bits) {
        const int64_t col = w * 64 + __builtin_ctzll(bits);
        bits &= bits - 1;
        const float s = to_float(*v++);
        for (int t = 0; t < TB; ++t) acc[t] += s * p.x[(t0 + t) * p.in + col];
      }
    }
    for (int64_t j = 0; j < p.rank; ++j) {
      const float u = to_float(U[o * p.rank + j]);
      for (int t = 0; t < TB; ++t) acc[t] += u * p.z[(t0 + t) * p.rank + j];
    }
    const float b = bias ? to_float(bias[o]) : 0.f;
    for (int t = 0; t < TB; ++t) p.y[(t0 + t) * p.out + o] = acc[t] + b;
  }
}

#ifdef SLR_X86
// ---------------------------------------------------------------- AVX-512 (16 columns a chunk)

#define SLR_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,bmi,bmi2,popcnt,fma,f16c")))

// `count` consecutive values (count <= 16), widened to fp32, in the low lanes.
SLR_AVX512 inline __m512 load16(const float* v, __mmask16 lanes) { return _mm512_maskz_loadu_ps(lanes, v); }
SLR_AVX512 inline __m512 load16(const c10::BFloat16* v, __mmask16 lanes) {
  const __m256i h = _mm256_maskz_loadu_epi16(lanes, v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
SLR_AVX512 inline __m512 load16(const c10::Half* v, __mmask16 lanes) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(lanes, v));
}

// The 16 lanes of one chunk: its `count` stored values placed at the set bits of `m`, zeros elsewhere.
SLR_AVX512 inline __m512 expand16(const float* v, uint16_t m, int) { return _mm512_maskz_expandloadu_ps(m, v); }
template <typename V>
SLR_AVX512 inline __m512 expand16(const V* v, uint16_t m, int count) {
  return _mm512_maskz_expand_ps(m, load16(v, static_cast<__mmask16>(_bzhi_u32(0xFFFF, count))));
}

// One 16-column chunk c: expand its values, one FMA per token. UNIFORM (N:M with M | 16): every
// chunk holds p.chunk_values values, so its values sit at a fixed offset (no popcount chain).
template <typename V, int TB, int ACC, bool UNIFORM>
SLR_AVX512 inline void fma_chunk(const Problem& p, const uint16_t* bits, int64_t c, const V* row, const V*& v,
                                 __m512 (&acc)[TB][ACC], int a, __mmask16 columns, const float* x) {
  uint16_t m;
  std::memcpy(&m, bits + c, sizeof(m));
  __m512 s;
  if constexpr (UNIFORM) {
    s = expand16(row + c * p.chunk_values, m, static_cast<int>(p.chunk_values));
  } else {
    const int count = __builtin_popcount(m);
    s = expand16(v, m, count);
    v += count;
  }
  for (int t = 0; t < TB; ++t)
    acc[t][a] = _mm512_fmadd_ps(s, _mm512_maskz_loadu_ps(columns, x + t * p.in + c * 16), acc[t][a]);
}

template <typename V, int TB, bool UNIFORM>
SLR_AVX512 void rows_avx512(const Problem& p, int64_t o0, int64_t o1, int64_t t0) {
  // Independent accumulators per token: enough FMA chains in flight when TB is small.
  constexpr int ACC = TB >= 4 ? 1 : 4 / TB;
  const V* values = static_cast<const V*>(p.values);
  const V* U = static_cast<const V*>(p.U);
  const V* bias = static_cast<const V*>(p.bias);
  const int64_t full = p.in / 16;
  const int64_t chunks = (p.in + 15) / 16;
  const __mmask16 tail = p.in % 16 ? static_cast<__mmask16>((1u << (p.in % 16)) - 1) : 0xFFFF;
  const float* x0 = p.x + t0 * p.in;
  for (int64_t o = o0; o < o1; ++o) {
    __m512 acc[TB][ACC];
    for (int t = 0; t < TB; ++t)
      for (int a = 0; a < ACC; ++a) acc[t][a] = _mm512_setzero_ps();
    const V* row = values + p.row_start[o];
    const V* v = row;
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(p.mask + o * p.words);
    int64_t c = 0;
    for (; c + ACC <= full; c += ACC)
      for (int a = 0; a < ACC; ++a) fma_chunk<V, TB, ACC, UNIFORM>(p, bits, c + a, row, v, acc, a, 0xFFFF, x0);
    for (; c < chunks; ++c) fma_chunk<V, TB, ACC, UNIFORM>(p, bits, c, row, v, acc, 0, c < full ? 0xFFFF : tail, x0);
    for (int64_t j = 0; j < p.rank; j += 16) {
      const __mmask16 lanes = static_cast<__mmask16>(_bzhi_u32(0xFFFF, static_cast<unsigned>(p.rank - j < 16 ? p.rank - j : 16)));
      const __m512 u = load16(U + o * p.rank + j, lanes);
      for (int t = 0; t < TB; ++t)
        acc[t][0] = _mm512_fmadd_ps(u, _mm512_maskz_loadu_ps(lanes, p.z + (t0 + t) * p.rank + j), acc[t][0]);
    }
    const float b = bias ? to_float(bias[o]) : 0.f;
    for (int t = 0; t < TB; ++t) {
      __m512 sum = acc[t][0];
      for (int a = 1; a < ACC; ++a) sum = _mm512_add_ps(sum, acc[t][a]);
      p.y[(t0 + t) * p.out + o] = _mm512_reduce_add_ps(sum) + b;
    }
  }
}

// Dense rows o0..o1 of S from the form, row o written at dense + (o - base) * in: each 16-column
// chunk expanded and stored (element size 2 or 4; the bits are copied, no conversion).
template <typename E>
SLR_AVX512 void expand_rows_avx512(const E* values, const uint64_t* mask, const int64_t* row_start, int64_t words,
                                   int64_t in, E* dense, int64_t base, int64_t o0, int64_t o1) {
  const int64_t chunks = (in + 15) / 16;
  for (int64_t o = o0; o < o1; ++o) {
    const E* v = values + row_start[o];
    const uint16_t* bits = reinterpret_cast<const uint16_t*>(mask + o * words);
    E* row = dense + (o - base) * in;
    for (int64_t c = 0; c < chunks; ++c) {
      uint16_t m;
      std::memcpy(&m, bits + c, sizeof(m));
      const int count = __builtin_popcount(m);
      const __mmask16 lanes = static_cast<__mmask16>(_bzhi_u32(0xFFFF, count));
      const __mmask16 columns = in - c * 16 >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (in - c * 16)) - 1);
      if constexpr (sizeof(E) == 4) {
        const __m512i e = _mm512_maskz_expand_epi32(m, _mm512_maskz_loadu_epi32(lanes, v));
        _mm512_mask_storeu_epi32(row + c * 16, columns, e);
      } else {
        const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, v));
        const __m256i e = _mm512_cvtepi32_epi16(_mm512_maskz_expand_epi32(m, wide));
        _mm256_mask_storeu_epi16(row + c * 16, columns, e);
      }
      v += count;
    }
  }
}

// ---------------------------------------------------------------- AVX2 (8 columns a chunk)

#define SLR_AVX2 __attribute__((target("avx2,fma,bmi,bmi2,popcnt,f16c")))

// For each 8-bit mask m: lane j takes value number popcount(m & ((1 << j) - 1)), or zero.
struct ExpandTable {
  alignas(32) int32_t index[256][8];
  alignas(32) int32_t keep[256][8];
  ExpandTable() {
    for (int m = 0; m < 256; ++m)
      for (int j = 0; j < 8; ++j) {
        index[m][j] = __builtin_popcount(m & ((1 << j) - 1)) & 7;
        keep[m][j] = (m >> j) & 1 ? -1 : 0;
      }
  }
};
const ExpandTable kExpand;

// Up to 8 consecutive values as fp32 (never reading past `end`).
SLR_AVX2 inline __m256 load8(const float* v, int count, const float* end) {
  (void)end;
  const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_maskload_ps(v, lanes);
}
template <typename H>
SLR_AVX2 inline __m128i load8_16bit(const H* v, int count, const H* end) {
  if (v + 8 <= end) return _mm_loadu_si128(reinterpret_cast<const __m128i*>(v));
  alignas(16) uint16_t buffer[8] = {};
  std::memcpy(buffer, v, sizeof(uint16_t) * static_cast<size_t>(count));
  return _mm_load_si128(reinterpret_cast<const __m128i*>(buffer));
}
SLR_AVX2 inline __m256 load8(const c10::BFloat16* v, int count, const c10::BFloat16* end) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(load8_16bit(v, count, end)), 16));
}
SLR_AVX2 inline __m256 load8(const c10::Half* v, int count, const c10::Half* end) {
  return _mm256_cvtph_ps(load8_16bit(v, count, end));
}
SLR_AVX2 inline __m256 masked_x(const float* x, int valid) {
  if (valid >= 8) return _mm256_loadu_ps(x);
  const __m256i lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(valid), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  return _mm256_maskload_ps(x, lanes);
}
SLR_AVX2 inline float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}

template <typename V, int TB, bool UNIFORM>
SLR_AVX2 void rows_avx2(const Problem& p, int64_t o0, int64_t o1, int64_t t0) {
  const V* values = static_cast<const V*>(p.values);
  const V* end = values + p.nnz;
  const V* U = static_cast<const V*>(p.U);
  const V* U_end = U + p.out * p.rank;
  const V* bias = static_cast<const V*>(p.bias);
  const int64_t chunks = (p.in + 7) / 8;
  const float* x0 = p.x + t0 * p.in;
  for (int64_t o = o0; o < o1; ++o) {
    __m256 acc[TB];
    for (int t = 0; t < TB; ++t) acc[t] = _mm256_setzero_ps();
    const V* row = values + p.row_start[o];
    const V* v = row;
    const uint8_t* bits = reinterpret_cast<const uint8_t*>(p.mask + o * p.words);
    for (int64_t c = 0; c < chunks; ++c) {
      const int m = bits[c];
      const int count = UNIFORM ? static_cast<int>(p.chunk_values) : __builtin_popcount(m);
      if (UNIFORM) v = row + c * p.chunk_values;
      const __m256i index = _mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.index[m]));
      const __m256 keep = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(kExpand.keep[m])));
      const __m256 s = _mm256_and_ps(_mm256_permutevar8x32_ps(load8(v, count, end), index), keep);
      v += count;
      const int valid = static_cast<int>(p.in - c * 8);
      for (int t = 0; t < TB; ++t) acc[t] = _mm256_fmadd_ps(s, masked_x(x0 + t * p.in + c * 8, valid), acc[t]);
    }
    for (int64_t j = 0; j < p.rank; j += 8) {
      const int count = static_cast<int>(p.rank - j < 8 ? p.rank - j : 8);
      const __m256 u = load8(U + o * p.rank + j, count, U_end);
      for (int t = 0; t < TB; ++t) acc[t] = _mm256_fmadd_ps(u, masked_x(p.z + (t0 + t) * p.rank + j, count), acc[t]);
    }
    const float b = bias ? to_float(bias[o]) : 0.f;
    for (int t = 0; t < TB; ++t) p.y[(t0 + t) * p.out + o] = hsum(acc[t]) + b;
  }
}
#endif  // SLR_X86

// ---------------------------------------------------------------- dispatch

Isa best_isa() {
#ifdef SLR_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("bmi2"))
    return kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return kAvx2;
#endif
  return kScalar;
}

using RowKernel = void (*)(const Problem&, int64_t, int64_t, int64_t);

template <typename V, int TB>
RowKernel kernel_for(Isa isa, bool uniform) {
#ifdef SLR_X86
  if (isa == kAvx512) return uniform ? rows_avx512<V, TB, true> : rows_avx512<V, TB, false>;
  if (isa == kAvx2) return uniform ? rows_avx2<V, TB, true> : rows_avx2<V, TB, false>;
#endif
  (void)uniform;
  return rows_scalar<V, TB>;
}

// Tokens are processed in blocks of 8, then 4, 2, 1 (so a block size is always a power of two).
template <typename V>
RowKernel kernel_for_block(Isa isa, bool uniform, int64_t block) {
  if (block >= 8) return kernel_for<V, 8>(isa, uniform);
  if (block >= 4) return kernel_for<V, 4>(isa, uniform);
  if (block >= 2) return kernel_for<V, 2>(isa, uniform);
  return kernel_for<V, 1>(isa, uniform);
}

constexpr int64_t kRowBlock = 16;

Isa checked_isa(int64_t requested) {
  const Isa best = best_isa();
  if (requested < 0) return best;
  TORCH_CHECK(requested <= best, "hf_slr kernels: ISA level ", requested, " is not supported by this CPU (best ", best, ")");
  return static_cast<Isa>(requested);
}

// Rows split across threads in blocks of kRowBlock; within a block, tokens in blocks of 8, 4, 2, 1.
template <typename V>
void run_rows(const Problem& p, Isa isa) {
  at::parallel_for(0, p.out, kRowBlock, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; o += kRowBlock) {
      const int64_t stop = std::min(end, o + kRowBlock);
      for (int64_t t0 = 0; t0 < p.tokens;) {
        const int64_t left = p.tokens - t0;
        const int64_t block = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
        kernel_for_block<V>(isa, p.chunk_values > 0, block)(p, o, stop, t0);
        t0 += block;
      }
    }
  });
}

void check_form(const at::Tensor& values, const at::Tensor& mask, const at::Tensor& row_start, int64_t in) {
  TORCH_CHECK(values.is_contiguous() && values.dim() == 1, "values: a contiguous 1-d tensor");
  TORCH_CHECK(mask.scalar_type() == at::kLong && mask.dim() == 2 && mask.is_contiguous(), "mask: contiguous int64 [out, words]");
  TORCH_CHECK(mask.size(1) * 64 >= in, "mask: too few words per row");
  TORCH_CHECK(row_start.scalar_type() == at::kLong && row_start.numel() == mask.size(0) + 1, "row_start: int64 [out + 1]");
}

}  // namespace

// y = x (S + U V)^T + b for x [tokens, in]; S from the masked-rows form; U [out, r], V [r, in].
at::Tensor masked_rows_linear(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                              const at::Tensor& row_start, const at::Tensor& U, const at::Tensor& V,
                              const c10::optional<at::Tensor>& bias, int64_t nm_n, int64_t nm_m, int64_t isa_level) {
  TORCH_CHECK(x.dim() == 2 && x.device().is_cpu(), "x: a 2-d CPU tensor");
  const int64_t in = x.size(1), out = mask.size(0), rank = U.size(1);
  check_form(values, mask, row_start, in);
  TORCH_CHECK(x.scalar_type() == values.scalar_type() && U.scalar_type() == values.scalar_type(), "one dtype for x, values, U, V");
  TORCH_CHECK(U.is_contiguous() && U.size(0) == out && V.size(0) == rank && V.size(1) == in, "U [out, r], V [r, in]");
  const at::Tensor x32 = x.to(at::kFloat).contiguous();
  const at::Tensor z = rank ? at::mm(x, V.t()).to(at::kFloat).contiguous() : at::empty({x.size(0), 0}, x32.options());
  at::Tensor b;
  if (bias.has_value() && bias->defined()) {
    b = bias->contiguous();
    TORCH_CHECK(b.scalar_type() == values.scalar_type() && b.numel() == out, "bias [out]");
  }
  at::Tensor y = at::empty({x.size(0), out}, x32.options());
  const Isa isa = checked_isa(isa_level);
  // N:M whose group divides the chunk width: every chunk holds the same number of values.
  const int64_t width = isa == kAvx512 ? 16 : 8;
  const int64_t chunk_values = isa != kScalar && nm_m > 0 && width % nm_m == 0 ? width / nm_m * nm_n : 0;
  Problem p{x.size(0), in, out, mask.size(1), rank, chunk_values, x32.data_ptr<float>(), values.data_ptr(), values.numel(),
            reinterpret_cast<const uint64_t*>(mask.data_ptr<int64_t>()), row_start.data_ptr<int64_t>(), U.data_ptr(),
            z.data_ptr<float>(), b.defined() ? b.data_ptr() : nullptr, y.data_ptr<float>()};
  switch (values.scalar_type()) {
    case at::kFloat: run_rows<float>(p, isa); break;
    case at::kBFloat16: run_rows<c10::BFloat16>(p, isa); break;
    case at::kHalf: run_rows<c10::Half>(p, isa); break;
    default: TORCH_CHECK(false, "masked_rows_linear: float32, bfloat16 or float16 values, got ", values.scalar_type());
  }
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

namespace {

// Rows first..last of S, dense, into `dense` ([last - first, in], the values' dtype; zeros where
// S has none). Rows are split across threads.
void expand_rows(const at::Tensor& values, const at::Tensor& mask, const at::Tensor& row_start, int64_t in, Isa isa,
                 int64_t first, int64_t last, at::Tensor& dense) {
  const int64_t words = mask.size(1);
  const auto* m = reinterpret_cast<const uint64_t*>(mask.data_ptr<int64_t>());
  const int64_t* starts = row_start.data_ptr<int64_t>();
  const size_t size = values.element_size();
  TORCH_CHECK(size == 2 || size == 4, "masked rows: 16- or 32-bit values");
  const char* v = static_cast<const char*>(values.data_ptr());
  char* d = static_cast<char*>(dense.data_ptr());
  at::parallel_for(first, last, kRowBlock, [&](int64_t begin, int64_t end) {
#ifdef SLR_X86
    if (isa == kAvx512) {
      if (size == 4)
        expand_rows_avx512(reinterpret_cast<const uint32_t*>(v), m, starts, words, in, reinterpret_cast<uint32_t*>(d), first, begin, end);
      else
        expand_rows_avx512(reinterpret_cast<const uint16_t*>(v), m, starts, words, in, reinterpret_cast<uint16_t*>(d), first, begin, end);
      return;
    }
#endif
    std::memset(d + (begin - first) * in * size, 0, static_cast<size_t>((end - begin) * in) * size);
    for (int64_t o = begin; o < end; ++o) {
      int64_t k = starts[o];
      for (int64_t w = 0; w < words; ++w) {
        uint64_t bits = load_word(m + o * words + w);
        while (bits) {
          const int64_t col = w * 64 + __builtin_ctzll(bits);
          bits &= bits - 1;
          std::memcpy(d + ((o - first) * in + col) * size, v + k * size, size);
          ++k;
        }
      }
    }
  });
}

}  // namespace

// Long inputs (prefill): y = x S^T + (x V^T) U^T + b, S expanded block of rows by block into one
// reused dense buffer of about `block_bytes` (cache-sized, never a full dense S), each block
// multiplied by one GEMM into its columns of y (a strided view: BLAS writes it in place).
at::Tensor masked_rows_prefill(const at::Tensor& x, const at::Tensor& values, const at::Tensor& mask,
                               const at::Tensor& row_start, const at::Tensor& U, const at::Tensor& V,
                               const c10::optional<at::Tensor>& bias, int64_t block_bytes, int64_t isa_level) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == values.scalar_type(), "x: 2-d, the values' dtype");
  const int64_t in = x.size(1), out = mask.size(0);
  check_form(values, mask, row_start, in);
  const Isa isa = checked_isa(isa_level);
  const int64_t block = std::max<int64_t>(kRowBlock, block_bytes / (in * values.element_size()) / kRowBlock * kRowBlock);
  at::Tensor y = at::empty({x.size(0), out}, x.options());
  at::Tensor buffer = at::empty({std::min(block, out), in}, values.options());
  for (int64_t first = 0; first < out; first += block) {
    const int64_t last = std::min(out, first + block);
    at::Tensor rows = buffer.narrow(0, 0, last - first);
    expand_rows(values, mask, row_start, in, isa, first, last, rows);
    at::Tensor columns = y.narrow(1, first, last - first);
    at::mm_out(columns, x, rows.t());
  }
  if (U.size(1)) y.addmm_(at::mm(x, V.t()), U.t());
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  return y;
}

// The masked-rows support from the checkpoint's packed stream, read once (no int64 temporaries):
// `packed` holds either the 1-bit mask (m == 0: bit o * in + c) or the N:M in-group positions
// (`bits` bits each, LSB first, row-major, N per group of M columns). Returns (mask [out, words],
// counts [out]): the row-padded 64-bit words and the number of stored values of each row.
std::vector<at::Tensor> masked_rows_support(const at::Tensor& packed, int64_t out, int64_t in, int64_t n, int64_t m,
                                            int64_t bits) {
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.is_contiguous() && packed.device().is_cpu(), "packed: uint8 CPU");
  const int64_t words = (in + 63) / 64;
  const int64_t per_row = m ? in / m * n : in;
  const int64_t width = m ? bits : 1;
  TORCH_CHECK(packed.numel() * 8 >= out * per_row * width, "packed: too short for the layout");
  at::Tensor mask = at::zeros({out, words}, packed.options().dtype(at::kLong));
  at::Tensor counts = at::empty({out}, packed.options().dtype(at::kLong));
  const uint8_t* stream = packed.data_ptr<uint8_t>();
  auto* w = reinterpret_cast<uint64_t*>(mask.data_ptr<int64_t>());
  int64_t* count = counts.data_ptr<int64_t>();
  at::parallel_for(0, out, kRowBlock, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      uint64_t* row = w + o * words;
      int64_t kept = 0;
      for (int64_t j = 0; j < per_row; ++j) {
        const int64_t bit = (o * per_row + j) * width;
        uint32_t value = 0;
        for (int64_t b = 0; b < width; ++b) value |= ((stream[(bit + b) >> 3] >> ((bit + b) & 7)) & 1u) << b;
        const int64_t column = m ? j / n * m + value : j;
        if (m == 0 && !value) continue;
        TORCH_CHECK(m == 0 || value < static_cast<uint32_t>(m), "packed: an N:M position is not below M");
        row[column >> 6] |= uint64_t{1} << (column & 63);
        ++kept;
      }
      count[o] = kept;
    }
  });
  return {mask, counts};
}

int64_t best_isa_level() { return best_isa(); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("masked_rows_linear", &masked_rows_linear, "y = x (S + U V)^T + b, S in masked-rows form");
  m.def("masked_rows_prefill", &masked_rows_prefill, "y = x (S + U V)^T + b for long x, S expanded block by block");
  m.def("masked_rows_support", &masked_rows_support, "row-padded 64-bit support words and row counts from packed bits");
  m.def("best_isa_level", &best_isa_level, "0: portable C++, 1: AVX2, 2: AVX-512");
}
