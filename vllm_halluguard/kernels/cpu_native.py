"""Native CPU kernels of the CPU engine's torch path: one call per layer for PruneHal's and KVSmooth's rows.

On the CPU engine a mitigated layer call was a sequence of small torch ops (a K gather, logits, softmax,
statistics, FIFO, EMA, cache writes), each costing a few µs of dispatch on the host whatever the tensors'
size; at the tiny fixtures' shapes the dispatch is the whole cost. These kernels do the same math for all
of a layer's rows in one call, reading and writing vLLM's CPU cache through its strided K/V views
(:func:`~vllm_halluguard.engine.cache_io.cpu_kernel_views`):

* :func:`prunehal_layer`: per row, the attention over its keys with the pruned visual keys masked, the
  head-averaged probabilities on the visual keys and their statistic, and, for the rows that prune in
  this layer, the masked attention output written over the native kernel's;
* :func:`prunehal_vote`: per request, the step's vote and history (the new masks of a request that
  prunes are selected in torch);
* :func:`kvsmooth_layer`: per row, the attention row's entropy (mean over heads of each head's entropy, or
  the entropy of the head-mean row), the FIFO push and rank lambda, and the EMA of the token's K and V
  with the previous slot's, written in the cache.

The C++ is compiled on first use with torch's extension JIT (``torch.utils.cpp_extension``: a C++
compiler and ninja, cached under ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``,
keyed by the source, the flags and the CPU) and loaded at engine start-up on the CPU platform
(:func:`warm_up`), so no compile happens while serving. Where it cannot be built (no compiler) or with
``HALLUGUARD_CPU_NATIVE=0`` the torch ops serve, with the same results up to float rounding (the kernels
sum in another order). Accumulation is fp32, as the torch path's; the cache's dtype is kept on write.
Tensor parallelism averages statistics over every rank's heads: those layers stay on the torch path.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import platform
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

if TYPE_CHECKING:
    from vllm_halluguard.methods.prunehal import PruneHalConfig

logger = logging.getLogger(__name__)

#: ``0`` keeps the CPU engine on the torch ops (no compile, no native kernel).
NATIVE_ENV = "HALLUGUARD_CPU_NATIVE"

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

// One (block, offset, head) row of a strided [NB, BS, H, D] cache view.
template <typename T>
struct View {
  T* data;
  int64_t s0, s1, s2, s3;
  explicit View(const torch::Tensor& t)
      : data(t.data_ptr<T>()), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)), s3(t.stride(3)) {}
  T* row(int64_t block, int64_t offset, int64_t head) const {
    return data + block * s0 + offset * s1 + head * s2;
  }
};

void check_cpu(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

// Every index the kernels follow stays inside its tensor: a row's pages (the blocks holding its `len`
// keys) inside the cache view, its token inside the query (and output) rows.
void check_row(const int64_t* ids, int64_t nb, int64_t len, int64_t bs, int64_t blocks, int64_t token,
               int64_t tokens) {
  TORCH_CHECK(len > 0 && len <= nb * bs, "halluguard native kernel: a row's length exceeds its pages");
  TORCH_CHECK(token >= 0 && token < tokens, "halluguard native kernel: a row's token is out of range");
  for (int64_t blk = 0; blk * bs < len; ++blk)
    TORCH_CHECK(ids[blk] >= 0 && ids[blk] < blocks, "halluguard native kernel: a page id is out of range");
}

// exp(x) for x <= 0 in place (Cephes' single-precision range reduction and polynomial, within 2 ulp):
// a plain loop the compiler vectorises. Below -87 it returns 0.
void exp_inplace(float* __restrict__ x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float in = x[i];
    const float v = in < -87.0f ? -87.0f : in;
    const float k = __builtin_floorf(v * 1.44269504088896341f + 0.5f);
    float r = v - k * 0.693359375f;
    r = r - k * -2.12194440e-4f;
    float y = 1.9875691500e-4f;
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * r * r + r + 1.0f;
    const float scale = __builtin_bit_cast(float, (static_cast<int32_t>(k) + 127) << 23);
    x[i] = in < -87.0f ? 0.0f : y * scale;
  }
}

// Logits q_g . K[s] (fp32, times `scale`) of the `g` query heads `q [g, d]` that share kv head `head`,
// over the keys s < len in pages `ids`, into `out [g, stride]`: each key is read once for the group.
template <typename T>
void logits(const float* __restrict__ q, int64_t g, const View<T>& k, const int64_t* ids, int64_t bs,
            int64_t head, int64_t len, int64_t d, float scale, float* __restrict__ out, int64_t stride) {
  for (int64_t blk = 0; blk * bs < len; ++blk) {
    const T* __restrict__ base = k.row(ids[blk], 0, head);
    const int64_t n = std::min(bs, len - blk * bs);
    for (int64_t gi = 0; gi < g; ++gi) {
      float* __restrict__ o = out + gi * stride + blk * bs;
      const float* __restrict__ qg = q + gi * d;
      if (k.s1 == 1 && n == 16) {  // a full head-dim-major page of 16 tokens: fixed-size vector loops
        float acc[16] = {0.f};
        for (int64_t j = 0; j < d; ++j) {
          const float qj = qg[j];
          const T* __restrict__ col = base + j * k.s3;
          for (int s = 0; s < 16; ++s) acc[s] += qj * static_cast<float>(col[s]);
        }
        for (int s = 0; s < 16; ++s) o[s] = acc[s];
      } else if (k.s1 == 1) {  // head-dim-major page: accumulate along the tokens (contiguous)
        for (int64_t s = 0; s < n; ++s) o[s] = 0.f;
        for (int64_t j = 0; j < d; ++j) {
          const float qj = qg[j];
          const T* __restrict__ col = base + j * k.s3;
          for (int64_t s = 0; s < n; ++s) o[s] += qj * static_cast<float>(col[s]);
        }
      } else {
        for (int64_t s = 0; s < n; ++s) {
          const T* __restrict__ kr = base + s * k.s1;
          float acc = 0.f;
          for (int64_t j = 0; j < d; ++j) acc += qg[j] * static_cast<float>(kr[j * k.s3]);
          o[s] = acc;
        }
      }
      for (int64_t s = 0; s < n; ++s) o[s] *= scale;
    }
  }
}

// Softmax of `p[0:len]` (logits in, probabilities out) over the keys with allowed[s] (all where null);
// returns the log-sum-exp over them.
float softmax(float* p, int64_t len, const char* allowed) {
  float mx = -INFINITY;
  for (int64_t s = 0; s < len; ++s)
    if (allowed == nullptr || allowed[s]) mx = std::max(mx, p[s]);
  for (int64_t s = 0; s < len; ++s) p[s] -= mx;
  exp_inplace(p, len);
  if (allowed != nullptr)
    for (int64_t s = 0; s < len; ++s) p[s] = allowed[s] ? p[s] : 0.f;
  float sum = 0.f;
  for (int64_t s = 0; s < len; ++s) sum += p[s];
  const float inv = 1.f / sum;
  for (int64_t s = 0; s < len; ++s) p[s] *= inv;
  return mx + std::log(sum);
}

// out[0:d] = sum_s p[s] V[s] over the keys s < len with p[s] != 0.
template <typename T>
void weighted_values(const float* __restrict__ p, const View<T>& v, const int64_t* ids, int64_t bs,
                     int64_t head, int64_t len, int64_t d, float* __restrict__ out) {
  for (int64_t j = 0; j < d; ++j) out[j] = 0.f;
  for (int64_t s = 0; s < len; ++s) {
    const float w = p[s];
    if (w == 0.f) continue;
    const T* __restrict__ vr = v.row(ids[s / bs], s % bs, head);
    if (v.s3 == 1) {
      for (int64_t j = 0; j < d; ++j) out[j] += w * static_cast<float>(vr[j]);
    } else {
      for (int64_t j = 0; j < d; ++j) out[j] += w * static_cast<float>(vr[j * v.s3]);
    }
  }
}

// allowed[b * s_max + s]: the keys s < lens[b] of each row, with those at positions visual[b, j] >= 0
// where !keep[b, j] off (visual and keep [rows, n]).
std::vector<char> allowed_keys(const int64_t* lens, int64_t rows, int64_t s_max, const int64_t* visual,
                               const bool* keep, int64_t n) {
  std::vector<char> allowed(rows * s_max, 0);
  for (int64_t b = 0; b < rows; ++b) {
    std::fill_n(allowed.begin() + b * s_max, lens[b], 1);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t pos = visual[b * n + j];
      if (!keep[b * n + j] && pos >= 0 && pos < lens[b]) allowed[b * s_max + pos] = 0;
    }
  }
  return allowed;
}

template <typename T>
void load_query(const torch::Tensor& query, int64_t token, int64_t head, float* q, int64_t d) {
  const T* base = query.data_ptr<T>() + token * query.stride(0) + head * query.stride(1);
  for (int64_t j = 0; j < d; ++j) q[j] = static_cast<float>(base[j * query.stride(2)]);
}

}  // namespace

// PruneHal, one layer: see the Python wrapper.
std::tuple<torch::Tensor, torch::Tensor> prunehal_layer(
    torch::Tensor query, torch::Tensor last, torch::Tensor k_view, torch::Tensor v_view, torch::Tensor ids,
    torch::Tensor lens, torch::Tensor visual, torch::Tensor keep, torch::Tensor write, torch::Tensor sinks,
    torch::Tensor output, double scale, int64_t layer, bool mass) {
  TORCH_CHECK(keep.dim() == 3 && write.dim() == 2, "prunehal_layer: keep [B, L, Nv] and write [L, B]");
  TORCH_CHECK(layer >= 0 && layer < keep.size(1) && layer < write.size(0), "prunehal_layer: layer index");
  const bool has_sinks = sinks.numel() > 0;
  TORCH_CHECK(!has_sinks || (sinks.dim() == 3 && sinks.scalar_type() == torch::kFloat32 &&
                             sinks.size(0) == keep.size(0) && sinks.size(1) == keep.size(1) &&
                             sinks.size(2) == query.size(1)),
              "prunehal_layer: sinks [B, L, Hq] fp32");
  keep = keep.select(1, layer);
  write = write.select(0, layer);
  if (has_sinks) sinks = sinks.select(1, layer).contiguous();
  for (auto* t : {&query, &last, &k_view, &v_view, &ids, &lens, &visual, &keep, &write, &sinks, &output})
    check_cpu(*t, "prunehal_layer's tensors");
  TORCH_CHECK(last.scalar_type() == torch::kLong && ids.scalar_type() == torch::kLong &&
              lens.scalar_type() == torch::kLong && visual.scalar_type() == torch::kLong,
              "prunehal_layer: index tensors must be int64");
  TORCH_CHECK(keep.scalar_type() == torch::kBool && write.scalar_type() == torch::kBool,
              "prunehal_layer: keep and write must be bool");
  TORCH_CHECK(k_view.scalar_type() == query.scalar_type() && v_view.scalar_type() == query.scalar_type() &&
              output.scalar_type() == query.scalar_type(), "prunehal_layer: one float dtype");
  ids = ids.contiguous(); visual = visual.contiguous(); keep = keep.contiguous();
  last = last.contiguous(); lens = lens.contiguous(); write = write.contiguous();
  const int64_t rows = last.size(0), hq = query.size(1), d = query.size(2), hkv = k_view.size(2);
  const int64_t bs = k_view.size(1), nv = visual.size(1), nb = ids.size(1);
  TORCH_CHECK(hq % hkv == 0 && k_view.size(3) == d && output.size(1) == hq && output.size(2) == d,
              "prunehal_layer: head shapes");
  TORCH_CHECK(ids.size(0) == rows && lens.size(0) == rows && visual.size(0) == rows && keep.size(0) == rows &&
              keep.size(1) == nv && write.size(0) == rows, "prunehal_layer: one entry per row");
  const int64_t* last_p = last.data_ptr<int64_t>();
  const int64_t* ids_p = ids.data_ptr<int64_t>();
  const int64_t* lens_p = lens.data_ptr<int64_t>();
  const int64_t* vis_p = visual.data_ptr<int64_t>();
  const bool* keep_p = keep.data_ptr<bool>();
  const bool* write_p = write.data_ptr<bool>();
  const float* sinks_p = has_sinks ? sinks.data_ptr<float>() : nullptr;
  int64_t s_max = 1;
  const int64_t tokens = std::min(query.size(0), output.size(0));
  for (int64_t b = 0; b < rows; ++b) {
    check_row(ids_p + b * nb, nb, lens_p[b], bs, k_view.size(0), last_p[b], tokens);
    s_max = std::max(s_max, lens_p[b]);
  }
  // allowed keys per row: its length, the pruned visual keys off
  const std::vector<char> allowed = allowed_keys(lens_p, rows, s_max, vis_p, keep_p, nv);
  std::vector<float> per_head(rows * hq * nv, 0.f);
  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, query.scalar_type(), "prunehal_layer", [&] {
    const View<scalar_t> kv(k_view), vv(v_view);
    const int64_t group = hq / hkv;
    at::parallel_for(0, rows * hkv, 1, [&](int64_t lo, int64_t hi) {
      std::vector<float> q(group * d), probs(group * s_max), out(d);
      for (int64_t unit = lo; unit < hi; ++unit) {
        const int64_t b = unit / hkv, kh = unit % hkv, len = lens_p[b];
        for (int64_t gi = 0; gi < group; ++gi)
          load_query<scalar_t>(query, last_p[b], kh * group + gi, q.data() + gi * d, d);
        logits(q.data(), group, kv, ids_p + b * nb, bs, kh, len, d, static_cast<float>(scale), probs.data(),
               s_max);
        for (int64_t gi = 0; gi < group; ++gi) {
          const int64_t h = kh * group + gi;
          float* p = probs.data() + gi * s_max;
          const float lse = softmax(p, len, allowed.data() + b * s_max);
          float* st = per_head.data() + (b * hq + h) * nv;
          for (int64_t j = 0; j < nv; ++j) {
            const int64_t pos = vis_p[b * nv + j];
            st[j] = keep_p[b * nv + j] && pos >= 0 && pos < len ? p[pos] : 0.f;
          }
          if (!write_p[b]) continue;
          weighted_values(p, vv, ids_p + b * nb, bs, kh, len, d, out.data());
          // a sink logit takes its share of the mass: the keys keep exp(lse) / (exp(lse) + exp(sink))
          const float share = has_sinks ? 1.f / (1.f + std::exp(sinks_p[b * hq + h] - lse)) : 1.f;
          scalar_t* o = output.data_ptr<scalar_t>() + last_p[b] * output.stride(0) + h * output.stride(1);
          for (int64_t j = 0; j < d; ++j) o[j * output.stride(2)] = static_cast<scalar_t>(out[j] * share);
        }
      }
    });
  });
  auto stat = torch::empty({rows, nv}, torch::kFloat32);
  auto statistic = torch::empty({rows}, torch::kFloat32);
  float* stat_p = stat.data_ptr<float>();
  float* a_p = statistic.data_ptr<float>();
  for (int64_t b = 0; b < rows; ++b) {
    float total = 0.f, kept = 0.f;
    for (int64_t j = 0; j < nv; ++j) {
      float acc = 0.f;
      for (int64_t h = 0; h < hq; ++h) acc += per_head[(b * hq + h) * nv + j];
      stat_p[b * nv + j] = acc / static_cast<float>(hq);
      if (keep_p[b * nv + j]) {
        total += stat_p[b * nv + j];
        kept += 1.f;
      }
    }
    a_p[b] = mass ? total : total / std::max(kept, 1.f);
  }
  return {stat, statistic};
}

// PruneHal's vote and history after a step (methods.prunehal: history_mean, should_prune, update_history):
// see the Python wrapper.
std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, torch::Tensor> prunehal_vote(
    torch::Tensor A, torch::Tensor hist_sum, torch::Tensor hist_n, torch::Tensor count, torch::Tensor steps,
    double threshold, int64_t t, double vote_frac, int64_t force_step, bool first_step_history) {
  for (auto* x : {&A, &hist_sum, &hist_n, &count, &steps}) check_cpu(*x, "prunehal_vote's tensors");
  TORCH_CHECK(A.scalar_type() == torch::kFloat32 && hist_sum.scalar_type() == torch::kFloat32 &&
              hist_n.scalar_type() == torch::kLong && count.scalar_type() == torch::kLong &&
              steps.scalar_type() == torch::kLong, "prunehal_vote: dtypes");
  A = A.contiguous(); hist_sum = hist_sum.contiguous(); hist_n = hist_n.contiguous();
  count = count.contiguous(); steps = steps.contiguous();
  const int64_t rows = A.size(0), n = A.size(1);
  auto fired = torch::empty({rows}, torch::kBool);
  auto new_count = torch::empty_like(count);
  auto new_sum = torch::empty_like(hist_sum);
  auto new_n = torch::empty_like(hist_n);
  const float thr = static_cast<float>(threshold);
  const float need = static_cast<float>(vote_frac - 1e-9);
  for (int64_t b = 0; b < rows; ++b) {
    const float* a = A.data_ptr<float>() + b * n;
    const float* hs = hist_sum.data_ptr<float>() + b * n;
    const int64_t hn = hist_n.data_ptr<int64_t>()[b];
    float votes = 0.f;
    for (int64_t l = 0; l < n; ++l) {  // NaN history (no step yet) never votes
      const float history = hn > 0 ? hs[l] / std::max(static_cast<float>(hn), 1.f) : NAN;
      votes += (thr * history > a[l]) ? 1.f : 0.f;
    }
    bool majority = votes / static_cast<float>(n) >= need;
    const int64_t step = steps.data_ptr<int64_t>()[b];
    if (force_step >= 0) majority = step == force_step || (step > force_step && majority);
    const int64_t c = count.data_ptr<int64_t>()[b];
    const bool f = majority && c < t;
    fired.data_ptr<bool>()[b] = f;
    new_count.data_ptr<int64_t>()[b] = c + (f ? 1 : 0);
    float* ns = new_sum.data_ptr<float>() + b * n;
    if (first_step_history) {
      for (int64_t l = 0; l < n; ++l) ns[l] = hn == 0 ? a[l] : hs[l];
      new_n.data_ptr<int64_t>()[b] = hn == 0 ? 1 : hn;
    } else {
      for (int64_t l = 0; l < n; ++l) ns[l] = f ? a[l] : hs[l] + a[l];
      new_n.data_ptr<int64_t>()[b] = f ? 1 : hn + 1;
    }
  }
  return {fired, new_count, new_sum, new_n};
}

// KVSmooth, one layer: see the Python wrapper.
void kvsmooth_layer(torch::Tensor query, torch::Tensor token, torch::Tensor k_view, torch::Tensor v_view,
                    torch::Tensor ids, torch::Tensor lens, torch::Tensor queue, torch::Tensor count,
                    torch::Tensor slot, int64_t layer, torch::Tensor first, torch::Tensor blocks,
                    torch::Tensor offsets, torch::Tensor visual, torch::Tensor keep, int64_t window,
                    double lo, double hi, bool inclusive, bool by_window, bool entropy_of_mean,
                    double scale) {
  for (auto* t : {&query, &token, &k_view, &v_view, &ids, &lens, &queue, &count, &slot, &first, &blocks,
                  &offsets, &visual, &keep})
    check_cpu(*t, "kvsmooth_layer's tensors");
  TORCH_CHECK(queue.scalar_type() == torch::kFloat32 && count.scalar_type() == torch::kLong &&
              queue.is_contiguous() && count.is_contiguous(), "kvsmooth_layer: FIFO dtypes");
  TORCH_CHECK(k_view.scalar_type() == query.scalar_type() && v_view.scalar_type() == query.scalar_type(),
              "kvsmooth_layer: one float dtype");
  TORCH_CHECK(window >= 1 && window <= queue.size(2) && layer >= 0 && layer < queue.size(1),
              "kvsmooth_layer: window or layer out of range");
  token = token.contiguous(); ids = ids.contiguous(); lens = lens.contiguous(); slot = slot.contiguous();
  blocks = blocks.contiguous(); offsets = offsets.contiguous(); first = first.contiguous();
  const int64_t rows = token.size(0), hq = query.size(1), d = query.size(2), hkv = k_view.size(2);
  const int64_t bs = k_view.size(1), nb = ids.size(1), width = queue.size(2), layers = queue.size(1);
  TORCH_CHECK(hq % hkv == 0 && k_view.size(3) == d, "kvsmooth_layer: head shapes");
  TORCH_CHECK(ids.size(0) == rows && lens.size(0) == rows && slot.size(0) == rows && blocks.size(0) == rows &&
              offsets.size(0) == rows && blocks.size(1) == 2 && offsets.size(1) == 2 &&
              (first.numel() == 0 || first.numel() == rows), "kvsmooth_layer: one entry per row");
  TORCH_CHECK(token.scalar_type() == torch::kLong && ids.scalar_type() == torch::kLong &&
              lens.scalar_type() == torch::kLong && slot.scalar_type() == torch::kLong &&
              blocks.scalar_type() == torch::kLong && offsets.scalar_type() == torch::kLong &&
              (first.numel() == 0 || first.scalar_type() == torch::kBool), "kvsmooth_layer: index dtypes");
  const bool has_first = first.numel() > 0;
  const bool masked = visual.numel() > 0;
  TORCH_CHECK(!masked || (visual.dim() == 2 && visual.size(0) == rows &&
                          visual.scalar_type() == torch::kLong && keep.sizes() == visual.sizes() &&
                          keep.scalar_type() == torch::kBool),
              "kvsmooth_layer: kept keys visual [B, N] int64 and keep [B, N] bool");
  visual = visual.contiguous(); keep = keep.contiguous();
  const int64_t* tok_p = token.data_ptr<int64_t>();
  const int64_t* ids_p = ids.data_ptr<int64_t>();
  const int64_t* lens_p = lens.data_ptr<int64_t>();
  const int64_t* slot_p = slot.data_ptr<int64_t>();
  const int64_t* blk_p = blocks.data_ptr<int64_t>();
  const int64_t* off_p = offsets.data_ptr<int64_t>();
  const bool* first_p = has_first ? first.data_ptr<bool>() : nullptr;
  float* queue_p = queue.data_ptr<float>();
  int64_t* count_p = count.data_ptr<int64_t>();
  int64_t s_max = 1;
  for (int64_t b = 0; b < rows; ++b) {
    check_row(ids_p + b * nb, nb, lens_p[b], bs, k_view.size(0), tok_p[b], query.size(0));
    TORCH_CHECK(slot_p[b] >= 0 && slot_p[b] < queue.size(0), "kvsmooth_layer: a row's slot is out of range");
    for (int64_t i = 2 * b; i < 2 * b + 2; ++i)
      TORCH_CHECK(blk_p[i] >= 0 && blk_p[i] < k_view.size(0) && off_p[i] >= 0 && off_p[i] < bs,
                  "kvsmooth_layer: an EMA address is out of range");
    s_max = std::max(s_max, lens_p[b]);
  }
  // another method's key mask (a composition): the keys at visual[b, j] >= 0 where !keep[b, j] are off
  std::vector<char> allowed;
  if (masked)
    allowed = allowed_keys(lens_p, rows, s_max, visual.data_ptr<int64_t>(), keep.data_ptr<bool>(),
                           visual.size(1));
  // per (row, head): the probabilities (entropy of the mean) or the head's entropy (mean of entropies)
  std::vector<float> probs(entropy_of_mean ? rows * hq * s_max : 0), head_z(rows * hq, 0.f);
  AT_DISPATCH_FLOATING_TYPES_AND2(torch::kBFloat16, torch::kHalf, query.scalar_type(), "kvsmooth_layer", [&] {
    const View<scalar_t> kv(k_view), vv(v_view);
    const int64_t group = hq / hkv;
    at::parallel_for(0, rows * hkv, 1, [&](int64_t u0, int64_t u1) {
      std::vector<float> q(group * d), own(group * s_max), copy(s_max);
      for (int64_t unit = u0; unit < u1; ++unit) {
        const int64_t b = unit / hkv, kh = unit % hkv, len = lens_p[b];
        // the group's rows: in `probs` (entropy of the mean) or in `own`
        float* rows_p = entropy_of_mean ? probs.data() + (b * hq + kh * group) * s_max : own.data();
        for (int64_t gi = 0; gi < group; ++gi)
          load_query<scalar_t>(query, tok_p[b], kh * group + gi, q.data() + gi * d, d);
        logits(q.data(), group, kv, ids_p + b * nb, bs, kh, len, d, static_cast<float>(scale), rows_p, s_max);
        const char* on = masked ? allowed.data() + b * s_max : nullptr;
        for (int64_t gi = 0; gi < group; ++gi) {
          float* p = rows_p + gi * s_max;
          if (entropy_of_mean) {
            softmax(p, len, on);
            continue;
          }
          std::copy(p, p + len, copy.begin());  // H = LSE - sum_s p_s l_s (no log per key)
          const float lse = softmax(p, len, on);
          float mean_logit = 0.f;
          for (int64_t s = 0; s < len; ++s) mean_logit += p[s] * copy[s];
          head_z[b * hq + kh * group + gi] = lse - mean_logit;
        }
      }
    });
    at::parallel_for(0, rows, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t len = lens_p[b];
        float z = 0.f;
        if (entropy_of_mean) {
          float e = 0.f;
          for (int64_t s = 0; s < len; ++s) {
            float m = 0.f;
            for (int64_t h = 0; h < hq; ++h) m += probs[(b * hq + h) * s_max + s];
            m /= static_cast<float>(hq);
            e += m > 0.f ? m * std::log(m) : 0.f;
          }
          z = -e;
        } else {
          for (int64_t h = 0; h < hq; ++h) z += head_z[b * hq + h];
          z /= static_cast<float>(hq);
        }
        // FIFO push and rank lambda (methods.kvsmooth.update_lambda)
        float* fifo = queue_p + (slot_p[b] * layers + layer) * width;
        int64_t& pushed = count_p[slot_p[b] * layers + layer];
        fifo[pushed % window] = z;
        pushed += 1;
        const int64_t filled = std::min<int64_t>(pushed, window);
        int64_t below = 0;
        for (int64_t w = 0; w < filled; ++w) below += inclusive ? (fifo[w] <= z) : (fifo[w] < z);
        float lam = static_cast<float>(below) / static_cast<float>(by_window ? window : filled);
        lam = std::min(std::max(lam, static_cast<float>(lo)), static_cast<float>(hi));
        if (has_first && first_p[b]) lam = 0.f;
        const float keep = 1.f - lam;
        // EMA of the token's slot (offsets[b][1]) with the previous one ([b][0]), K and V, in place
        for (int64_t h = 0; h < hkv; ++h) {
          for (const View<scalar_t>* cache : {&kv, &vv}) {
            const scalar_t* prev = cache->row(blk_p[2 * b], off_p[2 * b], h);
            scalar_t* cur = cache->row(blk_p[2 * b + 1], off_p[2 * b + 1], h);
            for (int64_t j = 0; j < d; ++j) {
              const float a = keep * static_cast<float>(cur[j * cache->s3]);
              const float c = lam * static_cast<float>(prev[j * cache->s3]);
              cur[j * cache->s3] = static_cast<scalar_t>(a + c);
            }
          }
        }
      }
    });
  });
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("prunehal_layer", &prunehal_layer, "PruneHal: one layer of the torch path's rows");
  m.def("prunehal_vote", &prunehal_vote, "PruneHal: the vote and history after a step");
  m.def("kvsmooth_layer", &kvsmooth_layer, "KVSmooth: one smoothed layer of the torch path's rows");
}
"""

_lock = threading.Lock()
_module: Any = None
#: Empty tensors for a kernel's absent optional argument.
_NONE_B, _NONE_L, _NONE_F = (torch.empty(0, dtype=dt) for dt in (torch.bool, torch.long, torch.float32))
_failed = False


#: Tuned for the machine that compiles (the build runs where it serves); OpenMP for ``at::parallel_for``;
#: no fused multiply-adds (each product rounded, as in the torch ops); no trapping math, which lets the
#: compiler vectorise the loops with branches (the same results: no floating-point exception is read).
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-fno-trapping-math"]


def _name() -> str:
    """The build's name: the source, flags and this machine's CPU (a shared cache never serves a build
    for another CPU)."""
    cpu = platform.machine()
    with contextlib.suppress(OSError):  # not Linux: the architecture alone
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu += next((ln for ln in lines if ln.startswith("flags")), "")
    digest = hashlib.sha256("\0".join([SOURCE, *CFLAGS, cpu]).encode()).hexdigest()[:12]
    return "halluguard_cpu_" + digest


def enabled() -> bool:
    """Whether the native kernels may be used (``HALLUGUARD_CPU_NATIVE`` is not ``0``)."""
    return os.environ.get(NATIVE_ENV, "1") != "0"


def module() -> Any:
    """The compiled kernels (built or loaded on first call, then kept), or ``None`` where they are off or
    cannot be built (logged once; the torch ops serve)."""
    global _module, _failed
    if _module is not None or _failed or not enabled():
        return _module if enabled() else None
    with _lock:
        if _module is None and not _failed:
            _module = _build()
            _failed = _module is None
    return _module


def _build() -> Any:
    from torch.utils import cpp_extension

    env_bin = str(Path(sys.executable).parent)  # ninja from the environment, also where it is not on PATH
    path = os.environ.get("PATH", "")
    if env_bin not in path.split(os.pathsep):
        os.environ["PATH"] = env_bin + os.pathsep + path if path else env_bin
    start = time.perf_counter()
    try:
        mod = cpp_extension.load_inline(
            _name(), cpp_sources=[SOURCE], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"], verbose=False
        )
    except Exception as exc:  # any build failure leaves the torch ops serving
        logger.warning("halluguard: the native CPU kernels could not be built (%s); torch ops serve", exc)
        return None
    logger.info("halluguard: native CPU kernels ready in %.1f s", time.perf_counter() - start)
    return mod


def warm_up() -> None:
    """Build or load the kernels now (the CPU engine's start-up), so that serving never compiles."""
    module()


def prunehal_layer(
    query: torch.Tensor,
    last: torch.Tensor,
    k_view: torch.Tensor,
    v_view: torch.Tensor,
    ids: torch.Tensor,
    lens: torch.Tensor,
    visual: torch.Tensor,
    keep: torch.Tensor,
    write: torch.Tensor,
    output: torch.Tensor,
    scale: float,
    layer: int,
    statistic: str,
    sinks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer index ``layer`` of PruneHal for ``B`` single-token rows: row ``b`` is token ``last[b]`` of
    ``query [T, Hq, D]`` attending to its ``lens[b]`` keys in pages ``ids [B, n_blocks]`` of the
    ``[NB, BS, Hkv, D]`` views, with its visual keys at ``visual [B, Nv]`` masked where ``keep[b, layer]``
    (``keep [B, L, Nv]``) is False. Where ``write[layer, b]`` its attention output is written to
    ``output[last[b]]``, with the per-head sink logits ``sinks[b, layer]`` (``[B, L, Hq]`` fp32, ``-inf``:
    none) taking their share of the mass (a composition's FarSight mode B). Returns fp32 ``[B, Nv]``, the
    head mean of the probabilities on the visual keys (zero on the pruned ones; no sink), and ``[B]``,
    their mean over the kept keys (``statistic="mean"``) or sum (``"mass"``):
    :func:`~vllm_halluguard.methods.prunehal.scores_statistic`."""
    mod = _module if _module is not None else module()
    assert mod is not None, "the native CPU kernels are off or could not be built"
    return cast(
        tuple[torch.Tensor, torch.Tensor],
        mod.prunehal_layer(
            query,
            last,
            k_view,
            v_view,
            ids,
            lens,
            visual,
            keep,
            write,
            _NONE_F if sinks is None else sinks,
            output,
            scale,
            layer,
            statistic == "mass",
        ),
    )


def prunehal_vote(
    A: torch.Tensor,
    hist_sum: torch.Tensor,
    hist_n: torch.Tensor,
    count: torch.Tensor,
    steps: torch.Tensor,
    cfg: PruneHalConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`~vllm_halluguard.methods.prunehal.prune_step` less the new masks: from the step's statistic
    ``A [B, L]``, the history ``(hist_sum [B, L], hist_n [B])``, prunes so far ``count [B]`` and the
    decision steps ``steps [B]``, returns ``(fired [B], count, hist_sum, hist_n)`` after the step (the
    caller selects the masks of the requests that fired)."""
    mod = _module if _module is not None else module()
    assert mod is not None and cfg.t is not None, "the native CPU kernels are off or the config unresolved"
    force = -1 if cfg.force_step is None else cfg.force_step
    return cast(
        tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        mod.prunehal_vote(
            A, hist_sum, hist_n, count, steps, cfg.threshold(), cfg.t, cfg.vote_frac, force,
            cfg.history == "first_step",
        ),
    )  # fmt: skip


def kvsmooth_layer(
    query: torch.Tensor,
    token: torch.Tensor,
    k_view: torch.Tensor,
    v_view: torch.Tensor,
    ids: torch.Tensor,
    lens: torch.Tensor,
    queue: torch.Tensor,
    count: torch.Tensor,
    slot: torch.Tensor,
    layer: int,
    first: torch.Tensor | None,
    blocks: torch.Tensor,
    offsets: torch.Tensor,
    *,
    kept: tuple[torch.Tensor, torch.Tensor] | None = None,
    window: int,
    lo: float,
    hi: float,
    inclusive: bool,
    by_window: bool,
    entropy_of_mean: bool,
    scale: float,
) -> None:
    """One KVSmooth layer of ``B`` decode rows (row ``b``: token ``token[b]``, ``lens[b]`` keys in pages
    ``ids``): the attention row's entropy, the push into FIFO ``queue[slot[b], layer, :window]`` (push
    count ``count[slot[b], layer]``), the rank lambda clipped to ``[lo, hi]`` (0 where ``first[b]``), and
    the EMA of the K and V at cache ``(blocks[b, 1], offsets[b, 1])`` with those at ``[b, 0]``, in place.
    ``kept = (visual [B, N], keep [B, N])``: another method's key mask (a composition's PruneHal): the keys
    at positions ``visual[b, j] >= 0`` where ``keep[b, j]`` is False are left out of the entropy."""
    mod = _module if _module is not None else module()
    assert mod is not None, "the native CPU kernels are off or could not be built"
    visual, keep = (_NONE_L, _NONE_B) if kept is None else kept
    mod.kvsmooth_layer(
        query, token, k_view, v_view, ids, lens, queue, count, slot, layer,
        _NONE_B if first is None else first, blocks, offsets, visual, keep, window, lo, hi, inclusive,
        by_window, entropy_of_mean, scale,
    )  # fmt: skip
