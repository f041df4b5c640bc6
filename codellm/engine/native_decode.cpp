// The decode step of a Llama model in one C call: a token at its own (slot, position) per row; rows of
// one slot at consecutive positions make a prompt chunk, so the same call also prefills.
//
// Built at first use by codellm/engine/native.py (g++ -O3 -march=native -fopenmp) and called through
// ctypes with raw pointers: one call per step instead of ~100 PyTorch ops, each with its dispatch and
// thread fork-join. Weights and KV cache are the model's own tensors (not copied): the KV cache, embedding
// and norms fp32 or bf16, each matrix in its own kind (fp32, bf16, int8: see `Matrix`);
// activations are fp32. Per layer: RMSNorm, fused q/k/v matmul, RoPE from the Python-built tables, the
// new key/value written into the slot, attention over positions 0..pos, o_proj, RMSNorm, fused
// gate/up, SwiGLU, down_proj; then the final norm and the head. Matmuls are split over output rows
// between the OpenMP threads (the runtime torch itself loaded); each thread streams its weight rows
// once for every batch row, so a step reads the weights once whatever B.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace {

using bf16 = uint16_t;

inline float to_f32(float x) { return x; }
inline float to_f32(bf16 x) {
  uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void from_f32(float x, float* out) { *out = x; }
inline void from_f32(float x, bf16* out) {  // round to nearest even, as torch's .to(bfloat16)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) { *out = bf16((u >> 16) | 0x40); return; }  // NaN stays NaN
  *out = bf16((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline __m256 load8(const bf16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
#endif

// out[j * ldo + n] = sum_k x[j * K + k] * W[n * K + k] for one weight row n and BR batch rows: each
// weight vector loaded is used BR times. (Two or four weight rows per tile ran slower here.)
template <int BR, typename T>
inline void tile(const float* x, int K, const T* W, int n, float* out, int ldo) {
  const T* w = W + size_t(n) * K;
#if defined(__AVX2__) && defined(__FMA__)
  if (K % 32 == 0 && BR == 1) {  // one row: four sums in flight, so the FMA latency never waits
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int k = 0; k < K; k += 32) {
      a0 = _mm256_fmadd_ps(load8(w + k), _mm256_loadu_ps(x + k), a0);
      a1 = _mm256_fmadd_ps(load8(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
      a2 = _mm256_fmadd_ps(load8(w + k + 16), _mm256_loadu_ps(x + k + 16), a2);
      a3 = _mm256_fmadd_ps(load8(w + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    out[n] = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    return;
  }
  if (K % 8 == 0) {
    __m256 acc[BR];
    for (int j = 0; j < BR; j++) acc[j] = _mm256_setzero_ps();
    for (int k = 0; k < K; k += 8) {
      __m256 wv = load8(w + k);
      for (int j = 0; j < BR; j++) acc[j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + size_t(j) * K + k), acc[j]);
    }
    if constexpr (BR == 4) {  // the four sums at once: two rounds of pairwise adds, then the halves
      __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
      __m128 r = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
      float sums[4];
      _mm_storeu_ps(sums, r);
      for (int j = 0; j < 4; j++) out[size_t(j) * ldo + n] = sums[j];
    } else {
      for (int j = 0; j < BR; j++) out[size_t(j) * ldo + n] = hsum(acc[j]);
    }
    return;
  }
#endif
  for (int j = 0; j < BR; j++) {
    float s = 0.f;
    for (int k = 0; k < K; k++) s += x[size_t(j) * K + k] * to_f32(w[k]);
    out[size_t(j) * ldo + n] = s;
  }
}

// A weight matrix as codellm/weights.py describes it (`NativeMatrix`): rows of K inputs in one of these
// kinds. The quantized kinds are weight-only: a row's inputs come in groups of `group`, each with an fp32
// scale (and for int4 in min form an fp32 offset), so y = sum over groups of scale * (x . codes) [+ min *
// sum(x)]. 4-bit kinds pack two codes a byte, GGUF's order: in each 32 inputs, byte i holds input i (low
// half) and input i + 16 (high half). A new weight format is a kind here and its case in `matmul`.
enum Kind : int32_t { F32 = 0, BF16 = 1, INT8 = 2, INT4 = 3, NF4 = 4 };
struct Matrix {
  int32_t kind, group;
  const void* data;
  const float* scales;  // (N, K / group)
  const float* mins;    // (N, K / group) or null
};

const float kNF4[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                        -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                        0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
                        0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};

// the value code c stands for before its group's scale: int8 as is, int4 (q - 8) when symmetric, else q
inline float code_value(const Matrix& W, int n, int K, int k) {
  if (W.kind == INT8) return float(static_cast<const int8_t*>(W.data)[size_t(n) * K + k]);
  const uint8_t byte = static_cast<const uint8_t*>(W.data)[size_t(n) * K / 2 + size_t(k / 32) * 16 + k % 16];
  const int q = (k % 32) < 16 ? byte & 15 : byte >> 4;
  if (W.kind == NF4) return kNF4[q];
  return W.mins ? float(q) : float(q - 8);
}

#if defined(__AVX2__) && defined(__FMA__)
// 32 inputs of a 4-bit row from their 16 bytes -> four vectors of 8 code values, in input order
inline void decode32(const Matrix& W, const uint8_t* p, __m256 v[4]) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(15);
  const __m128i lo = _mm_and_si128(bytes, mask), hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  const __m128i parts[2] = {lo, hi};
  for (int h = 0; h < 2; h++)
    for (int q = 0; q < 2; q++) {
      const __m256i idx = _mm256_cvtepu8_epi32(q ? _mm_srli_si128(parts[h], 8) : parts[h]);
      if (W.kind == NF4) {
        const __m256 low = _mm256_permutevar8x32_ps(_mm256_loadu_ps(kNF4), idx);
        const __m256 high = _mm256_permutevar8x32_ps(_mm256_loadu_ps(kNF4 + 8), idx);
        v[2 * h + q] = _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7))));
      } else {
        const __m256 f = _mm256_cvtepi32_ps(idx);
        v[2 * h + q] = W.mins ? f : _mm256_sub_ps(f, _mm256_set1_ps(8.f));
      }
    }
}
#endif

// quantized rows: out[j * ldo + n] for one weight row n and BR batch rows, group by group
template <int BR>
inline void qtile(const float* x, int K, const Matrix& W, int n, float* out, int ldo) {
  const int G = W.group, groups = K / G;
  const float* scales = W.scales + size_t(n) * groups;
  const float* mins = W.mins ? W.mins + size_t(n) * groups : nullptr;
#if defined(__AVX2__) && defined(__FMA__)
  const bool four_bit = W.kind != INT8;
  if (four_bit ? G % 32 == 0 : G % 8 == 0) {
    __m256 total[BR];
    for (int j = 0; j < BR; j++) total[j] = _mm256_setzero_ps();
    for (int g = 0; g < groups; g++) {
      __m256 acc[BR], xsum[BR];
      for (int j = 0; j < BR; j++) acc[j] = xsum[j] = _mm256_setzero_ps();
      const int k0 = g * G;
      if (four_bit) {
        const uint8_t* row = static_cast<const uint8_t*>(W.data) + size_t(n) * K / 2;
        for (int k = k0; k < k0 + G; k += 32) {
          __m256 w[4];
          decode32(W, row + k / 2, w);
          for (int j = 0; j < BR; j++)
            for (int i = 0; i < 4; i++) {
              const __m256 xv = _mm256_loadu_ps(x + size_t(j) * K + k + 8 * i);
              acc[j] = _mm256_fmadd_ps(w[i], xv, acc[j]);
              if (mins) xsum[j] = _mm256_add_ps(xsum[j], xv);
            }
        }
      } else {
        const int8_t* row = static_cast<const int8_t*>(W.data) + size_t(n) * K;
        for (int k = k0; k < k0 + G; k += 8) {
          const __m256 w = load8(row + k);
          for (int j = 0; j < BR; j++) acc[j] = _mm256_fmadd_ps(w, _mm256_loadu_ps(x + size_t(j) * K + k), acc[j]);
        }
      }
      for (int j = 0; j < BR; j++) {
        total[j] = _mm256_fmadd_ps(acc[j], _mm256_set1_ps(scales[g]), total[j]);
        if (mins) total[j] = _mm256_fmadd_ps(xsum[j], _mm256_set1_ps(mins[g]), total[j]);
      }
    }
    for (int j = 0; j < BR; j++) out[size_t(j) * ldo + n] = hsum(total[j]);
    return;
  }
#endif
  for (int j = 0; j < BR; j++) {
    const float* xj = x + size_t(j) * K;
    float s = 0.f;
    for (int g = 0; g < groups; g++) {
      float dot = 0.f, xs = 0.f;
      for (int k = g * G; k < (g + 1) * G; k++) dot += xj[k] * code_value(W, n, K, k), xs += xj[k];
      s += dot * scales[g] + (mins ? mins[g] * xs : 0.f);
    }
    out[size_t(j) * ldo + n] = s;
  }
}

// out (B, N) = x (B, K) @ W (N, K)^T. Output rows are shared between the threads in blocks of 16; a
// block's weight rows are read from memory once, for the first tile of batch rows, then from cache.
template <typename Tile>
void matmul_blocks(const float* x, int B, int K, int N, float* out, int threads, Tile tile_at) {
  const int blocks = (N + 15) / 16;
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int blk = 0; blk < blocks; blk++) {
    const int lo = blk * 16, hi = lo + 16 < N ? lo + 16 : N;
    int b = 0;
    for (; b + 4 <= B; b += 4)
      for (int n = lo; n < hi; n++) tile_at(std::integral_constant<int, 4>(), x + size_t(b) * K, n, out + size_t(b) * N);
    for (; b < B; b++)
      for (int n = lo; n < hi; n++) tile_at(std::integral_constant<int, 1>(), x + size_t(b) * K, n, out + size_t(b) * N);
  }
}

template <typename T>
void matmul_dense(const float* x, int B, int K, const T* W, int N, float* out, int threads) {
  matmul_blocks(x, B, K, N, out, threads, [&](auto br, const float* xb, int n, float* ob) {
    tile<decltype(br)::value>(xb, K, W, n, ob, N);
  });
}

void matmul(const float* x, int B, int K, const Matrix& W, int N, float* out, int threads) {
  switch (W.kind) {
    case F32: return matmul_dense(x, B, K, static_cast<const float*>(W.data), N, out, threads);
    case BF16: return matmul_dense(x, B, K, static_cast<const bf16*>(W.data), N, out, threads);
    default:
      matmul_blocks(x, B, K, N, out, threads, [&](auto br, const float* xb, int n, float* ob) {
        qtile<decltype(br)::value>(xb, K, W, n, ob, N);
      });
  }
}

template <typename T>
void rms_norm(const float* x, int B, int D, const T* w, float eps, float* out) {
  for (int b = 0; b < B; b++) {
    const float* xb = x + size_t(b) * D;
    float ss = 0.f;
    for (int d = 0; d < D; d++) ss += xb[d] * xb[d];
    float r = 1.f / std::sqrt(ss / D + eps);
    for (int d = 0; d < D; d++) out[size_t(b) * D + d] = xb[d] * r * to_f32(w[d]);
  }
}

// sum_i a[i] * b[i], b in the cache's dtype
template <typename T>
inline float dot(const float* a, const T* b, int n) {
  float s = 0.f;
  int i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc);
  s = hsum(acc);
#endif
  for (; i < n; i++) s += a[i] * to_f32(b[i]);
  return s;
}

// out[i] += p * v[i], v in the cache's dtype
template <typename T>
inline void axpy(float p, const T* v, float* out, int n) {
  int i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 pv = _mm256_set1_ps(p);
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, load8(v + i), _mm256_loadu_ps(out + i)));
#endif
  for (; i < n; i++) out[i] += p * to_f32(v[i]);
}

struct Model {
  int layers, dim, heads, kv_heads, head_dim, hidden, vocab, slots, max_len;
  float eps;
  const void* embed;  // embedding, norms and KV cache: the model's dtype (T of `step`)
  std::vector<Matrix> qkv, o, gate_up, down;
  std::vector<const void*> norm_in, norm_post;
  const void* norm_final;
  Matrix lm_head;
  void* store_k;
  void* store_v;
  const float* rope_cos;  // (max_len, head_dim / 2)
  const float* rope_sin;
};

template <typename T>
void step(const Model& m, int B, const int64_t* tokens, const int64_t* positions, const int64_t* slots, int n_out,
          const int64_t* out_rows, float* logits, int threads) {
  const int D = m.dim, H = m.heads, KV = m.kv_heads, hd = m.head_dim, half = hd / 2, G = H / KV;
  const int QKV = (H + 2 * KV) * hd;
  const size_t plane = size_t(m.max_len) * hd;  // one (position, head_dim) plane of a kv head
  std::vector<float> x(size_t(B) * D), xn(size_t(B) * D), tmp(size_t(B) * D), qkv(size_t(B) * QKV),
      att(size_t(B) * H * hd), gu(size_t(B) * 2 * m.hidden), act(size_t(B) * m.hidden);
  T* sk = static_cast<T*>(m.store_k);
  T* sv = static_cast<T*>(m.store_v);
  for (int b = 0; b < B; b++) {
    const T* e = static_cast<const T*>(m.embed) + size_t(tokens[b]) * D;
    for (int d = 0; d < D; d++) x[size_t(b) * D + d] = to_f32(e[d]);
  }
  const float scale = 1.f / std::sqrt(float(hd));
  for (int l = 0; l < m.layers; l++) {
    rms_norm(x.data(), B, D, static_cast<const T*>(m.norm_in[l]), m.eps, xn.data());
    matmul(xn.data(), B, D, m.qkv[l], QKV, qkv.data(), threads);
    for (int b = 0; b < B; b++) {
      const float* c = m.rope_cos + size_t(positions[b]) * half;
      const float* s = m.rope_sin + size_t(positions[b]) * half;
      for (int h = 0; h < H + KV; h++) {  // query heads, then key heads: rotate_half RoPE
        float* v = qkv.data() + size_t(b) * QKV + size_t(h) * hd;
        for (int i = 0; i < half; i++) {
          float a = v[i], z = v[i + half];
          v[i] = a * c[i] - z * s[i];
          v[i + half] = z * c[i] + a * s[i];
        }
      }
      for (int g = 0; g < KV; g++) {  // the new key and value into the slot, at the row's position
        size_t at = ((size_t(slots[b]) * m.layers + l) * KV + g) * plane + size_t(positions[b]) * hd;
        const float* kn = qkv.data() + size_t(b) * QKV + size_t(H + g) * hd;
        const float* vn = qkv.data() + size_t(b) * QKV + size_t(H + KV + g) * hd;
        for (int i = 0; i < hd; i++) {
          from_f32(kn[i], sk + at + i);
          from_f32(vn[i], sv + at + i);
        }
      }
    }
#pragma omp parallel for schedule(dynamic) num_threads(threads)
    for (int task = 0; task < B * KV; task++) {  // one (row, kv head): its G query heads over positions 0..pos
      const int b = task / KV, g = task % KV, n = int(positions[b]) + 1;
      const size_t base = ((size_t(slots[b]) * m.layers + l) * KV + g) * plane;
      const float* q = qkv.data() + size_t(b) * QKV + size_t(g) * G * hd;
      float* out = att.data() + size_t(b) * H * hd + size_t(g) * G * hd;
      std::vector<float> score(size_t(G) * n);
      for (int t = 0; t < n; t++)
        for (int j = 0; j < G; j++) score[size_t(j) * n + t] = dot(q + size_t(j) * hd, sk + base + size_t(t) * hd, hd) * scale;
      for (int j = 0; j < G; j++) {  // softmax in place
        float* sj = score.data() + size_t(j) * n;
        float mx = sj[0], sum = 0.f;
        for (int t = 1; t < n; t++) mx = sj[t] > mx ? sj[t] : mx;
        for (int t = 0; t < n; t++) sum += (sj[t] = std::exp(sj[t] - mx));
        for (int t = 0; t < n; t++) sj[t] /= sum;
      }
      std::fill(out, out + size_t(G) * hd, 0.f);
      for (int t = 0; t < n; t++)
        for (int j = 0; j < G; j++) axpy(score[size_t(j) * n + t], sv + base + size_t(t) * hd, out + size_t(j) * hd, hd);
    }
    matmul(att.data(), B, H * hd, m.o[l], D, tmp.data(), threads);
    for (size_t i = 0; i < x.size(); i++) x[i] += tmp[i];
    rms_norm(x.data(), B, D, static_cast<const T*>(m.norm_post[l]), m.eps, xn.data());
    matmul(xn.data(), B, D, m.gate_up[l], 2 * m.hidden, gu.data(), threads);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int bi = 0; bi < B * m.hidden; bi++) {  // SwiGLU: silu(gate) * up
      const int b = bi / m.hidden, i = bi % m.hidden;
      const float gate = gu[size_t(b) * 2 * m.hidden + i], up = gu[size_t(b) * 2 * m.hidden + m.hidden + i];
      act[bi] = gate / (1.f + std::exp(-gate)) * up;
    }
    matmul(act.data(), B, m.hidden, m.down[l], D, tmp.data(), threads);
    for (size_t i = 0; i < x.size(); i++) x[i] += tmp[i];
  }
  for (int r = 0; r < n_out; r++)  // the head only for the rows that want logits (a chunk's last token)
    rms_norm(x.data() + size_t(out_rows[r]) * D, 1, D, static_cast<const T*>(m.norm_final), m.eps, xn.data() + size_t(r) * D);
  matmul(xn.data(), n_out, D, m.lm_head, m.vocab, logits, threads);
}

struct Decoder {
  Model m;
  bool bf16_model;
};

}  // namespace

extern "C" {

// shape: layers, dim, heads, kv_heads, head_dim, hidden, vocab, slots, max_len; matrices: 4 a layer (qkv,
// o, gate_up, down), then the head; norms: 2 a layer (input, post-attention). bf16_model: the dtype of the
// embedding, the norms and the KV cache (fp32 otherwise); each matrix says its own kind.
void* codellm_decoder_new(const int32_t* shape, float eps, int32_t bf16_model, const void* embed,
                          const Matrix* matrices, const void* const* norms, const void* norm_final, void* store_k,
                          void* store_v, const float* rope_cos, const float* rope_sin) {
  auto* d = new Decoder();
  Model& m = d->m;
  m.layers = shape[0], m.dim = shape[1], m.heads = shape[2], m.kv_heads = shape[3], m.head_dim = shape[4];
  m.hidden = shape[5], m.vocab = shape[6], m.slots = shape[7], m.max_len = shape[8];
  m.eps = eps, m.embed = embed, m.norm_final = norm_final, m.lm_head = matrices[4 * m.layers];
  m.store_k = store_k, m.store_v = store_v, m.rope_cos = rope_cos, m.rope_sin = rope_sin;
  for (int l = 0; l < m.layers; l++) {
    const Matrix* w = matrices + 4 * l;
    m.qkv.push_back(w[0]), m.o.push_back(w[1]), m.gate_up.push_back(w[2]), m.down.push_back(w[3]);
    m.norm_in.push_back(norms[2 * l]), m.norm_post.push_back(norms[2 * l + 1]);
  }
  d->bf16_model = bf16_model != 0;
  return d;
}

// rows tokens at (slot, position) each; all of them write their keys/values before any attends, so rows of
// one slot at consecutive positions are a causal prompt chunk. Logits for the n_out rows in out_rows.
void codellm_decoder_step(void* decoder, int32_t rows, const int64_t* tokens, const int64_t* positions,
                          const int64_t* slots, int32_t n_out, const int64_t* out_rows, float* logits,
                          int32_t threads) {
  const auto* d = static_cast<Decoder*>(decoder);
  if (d->bf16_model)
    step<bf16>(d->m, rows, tokens, positions, slots, n_out, out_rows, logits, threads);
  else
    step<float>(d->m, rows, tokens, positions, slots, n_out, out_rows, logits, threads);
}

void codellm_decoder_free(void* decoder) { delete static_cast<Decoder*>(decoder); }

}  // extern "C"
