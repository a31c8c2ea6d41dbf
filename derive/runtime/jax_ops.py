"""The implementation of :mod:`derive.jax`: the generated kernels as JAX functions.

Each kernel becomes a function of (logits, targets, params) whose value is the generated C kernel's
loss and whose derivatives are the kernel's own: ``jax.grad`` takes the fused gradient from the
same call as the loss, and second derivatives (``jax.hessian``, ``jax.grad(jax.grad(...))``, a
jvp of a grad) take the proved second derivative of the derivation file (elementwise
``derive_<kernel>_hess_*``, softmax ``derive_<kernel>_hvp_*``), never a silent zero.

How a call reaches the C: **XLA's FFI**.  A small C++ shim (:data:`SHIM_SOURCE`), compiled once
against the headers jaxlib ships (``jax.ffi.include_dir()``) and cached like the C kernels
(:mod:`derive.runtime.cbuild`: ``$DERIVE_CACHE_DIR``, owner-only, SHA-256 checked before it is
loaded), registers six FFI targets (elementwise loss+grad and hess, class-index loss+grad and
Hessian-vector product, class-probability loss+grad and Hessian-vector product).  The kernels
themselves are the C library cbuild builds from generated/<module>.c; the shim receives their
addresses as attributes and calls them through pointers of their exact prototypes, on XLA's
buffers (no copy, no Python in the call).  Where no C++ compiler or no C library is available
the same functions run through ``jax.pure_callback`` on the generated NumPy kernels (one
:class:`JaxFFIUnavailableWarning` says why); ``backend="callback"`` asks for that explicitly.

Derivative structure (why it is built this way):

* ``loss(x)`` is a ``jax.custom_jvp`` whose tangent is ``grad . dx`` with ``grad`` the second
  output of ``pair(x) = (loss, grad)``, one kernel call (first-order ``jax.grad`` and ``jax.jvp``
  cost one call, no second derivative is evaluated);
* ``pair`` is a ``jax.custom_jvp`` too, whose grad tangent is ``hess * dx`` (elementwise: the
  Hessian is diagonal) or ``hvp(x, dx)`` (softmax rows): a primitive of this module
  (``derive_hvp``), linear in its last operand, whose transpose is itself (the row Hessian is
  symmetric), batched for ``vmap``, and whose derivative in ``x`` (a third derivative) raises;
* targets and parameters are not differentiated: a tangent for them raises (wrap them in
  ``jax.lax.stop_gradient``) instead of a gradient of zero.

vmap: every FFI call uses ``vmap_method="broadcast_all"``; the shim reads the batch off the
parameter operand (P + 1 values per batch entry) and makes one kernel call per run of entries
with equal parameters (one call when only the arrays are batched).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

from derive.runtime import cbuild
from derive.runtime import losses

#: the C++ source of the FFI shim (compiled once per jaxlib and compiler, cached)
SHIM_SOURCE = r"""// derive.jax: XLA FFI handlers that call the generated C kernels (derive/runtime/jax_ops.py).
// The kernel functions come as addresses (attributes) from the C library derive.runtime.cbuild
// loaded; each call is made through a pointer of the kernel's exact prototype (P scalar params).
// Leading batch dimensions (vmap, "broadcast_all") are read off the params operand, which has
// P + 1 values per batch entry; runs of batch entries with equal params are one kernel call.
#include <cstdint>
#include <cstring>
#include <cmath>
#include <string>
#include <string_view>
#include <utility>
#include <vector>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kOk = 0, kEinval = 1, kElabel = 2;
template <typename T, size_t I> using Same = T;

// elementwise: int f(size_t n, const T *x, const T *t, T p..., T *loss, T *grad)
template <typename T, size_t... I>
int ew(int64_t fn, size_t n, const T *x, const T *t, const T *p, T *a, T *b, std::index_sequence<I...>) {
  using F = int (*)(size_t, const T *, const T *, Same<T, I>..., T *, T *);
  return reinterpret_cast<F>(fn)(n, x, t, p[I]..., a, b);
}
// elementwise hess: int f(size_t n, const T *x, const T *t, T p..., T *hess)
template <typename T, size_t... I>
int ewh(int64_t fn, size_t n, const T *x, const T *t, const T *p, T *h, std::index_sequence<I...>) {
  using F = int (*)(size_t, const T *, const T *, Same<T, I>..., T *);
  return reinterpret_cast<F>(fn)(n, x, t, p[I]..., h);
}
// class index: int f(size_t n, size_t k, const T *x, const int64_t *target, [const T *alpha_vec,] T p...,
//                    int64_t ignore_index, <A> a, <B> b) with (a, b) = (loss, grad) or (v, out)
template <typename T, typename A, typename B, size_t... I>
int ci(int64_t fn, size_t n, size_t k, const T *x, const int64_t *tg, const T *p, int64_t ign, A a, B b,
       std::index_sequence<I...>) {
  using F = int (*)(size_t, size_t, const T *, const int64_t *, Same<T, I>..., int64_t, A, B);
  return reinterpret_cast<F>(fn)(n, k, x, tg, p[I]..., ign, a, b);
}
template <typename T, typename A, typename B, size_t... I>
int cia(int64_t fn, size_t n, size_t k, const T *x, const int64_t *tg, const T *av, const T *p, int64_t ign,
        A a, B b, std::index_sequence<I...>) {  // alpha (a vector, or NULL and the scalar p[0]) first
  using F = int (*)(size_t, size_t, const T *, const int64_t *, const T *, T, Same<T, I>..., int64_t, A, B);
  return reinterpret_cast<F>(fn)(n, k, x, tg, av, p[0], p[I + 1]..., ign, a, b);
}
// class probabilities: int f(size_t n, size_t k, const T *x, const T *q, T p..., <A> a, <B> b)
template <typename T, typename A, typename B, size_t... I>
int cp(int64_t fn, size_t n, size_t k, const T *x, const T *q, const T *p, A a, B b, std::index_sequence<I...>) {
  using F = int (*)(size_t, size_t, const T *, const T *, Same<T, I>..., A, B);
  return reinterpret_cast<F>(fn)(n, k, x, q, p[I]..., a, b);
}

#define DERIVE_ARITY(P, CALL)                      \
  switch (P) {                                     \
    case 0: { auto seq = std::make_index_sequence<0>(); return CALL; } \
    case 1: { auto seq = std::make_index_sequence<1>(); return CALL; } \
    case 2: { auto seq = std::make_index_sequence<2>(); return CALL; } \
    case 3: { auto seq = std::make_index_sequence<3>(); return CALL; } \
    case 4: { auto seq = std::make_index_sequence<4>(); return CALL; } \
    case 5: { auto seq = std::make_index_sequence<5>(); return CALL; } \
    case 6: { auto seq = std::make_index_sequence<6>(); return CALL; } \
    default: return -1;                            \
  }

template <typename T>
int call_ew(int64_t fn, int64_t P, bool hess, size_t n, const T *x, const T *t, const T *p, T *a, T *b) {
  if (hess) { DERIVE_ARITY(P, ewh<T>(fn, n, x, t, p, a, seq)) }
  DERIVE_ARITY(P, ew<T>(fn, n, x, t, p, a, b, seq))
}
template <typename T, typename A, typename B>
int call_ci(int64_t fn, int64_t P, bool class_alpha, size_t n, size_t k, const T *x, const int64_t *tg,
            const T *av, const T *p, int64_t ign, A a, B b) {
  if (class_alpha) {
    if (P < 1) return -1;
    DERIVE_ARITY(P - 1, (cia<T, A, B>(fn, n, k, x, tg, av, p, ign, a, b, seq)))
  }
  DERIVE_ARITY(P, (ci<T, A, B>(fn, n, k, x, tg, p, ign, a, b, seq)))
}
template <typename T, typename A, typename B>
int call_cp(int64_t fn, int64_t P, size_t n, size_t k, const T *x, const T *q, const T *p, A a, B b) {
  DERIVE_ARITY(P, (cp<T, A, B>(fn, n, k, x, q, p, a, b, seq)))
}

template <typename T>
std::string fmt(T v) {  // shortest round-trip digits of the kernel's type
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.*g", sizeof(T) == 4 ? 9 : 17, (double)v);
  return buf;
}

ffi::Error error(std::string_view name, int rc, std::string what) {
  std::string msg = "derive kernel " + std::string(name) + ": ";
  if (rc == -1) msg += "internal error: unsupported number of parameters";
  else msg += what;
  return ffi::Error::InvalidArgument(msg);
}

template <typename T>
std::string first_bad(const T *t, size_t n, bool soft) {
  for (size_t i = 0; i < n; ++i) {
    T v = t[i];
    bool ok = soft ? (v >= 0 && v <= 1) : (v == 0 || v == 1);
    if (!ok) return fmt<T>(v) + " at flat index " + std::to_string(i);
  }
  return "none";
}

// "a parameter outside its domain" with the names, values and domains (attribute "params":
// "name:domain;name:domain;...", in the kernel's order)
template <typename T>
std::string einval(std::string_view params, const T *p, std::string_view extra) {
  std::string msg = "a parameter is outside its domain or NaN" + std::string(extra) + ":";
  size_t i = 0;
  while (!params.empty()) {
    size_t semi = params.find(';');
    std::string_view item = params.substr(0, semi);
    size_t colon = item.find(':');
    msg += (i ? ", " : " ") + std::string(item.substr(0, colon)) + " = " + fmt<T>(p[i]) + " (must be " +
           std::string(item.substr(colon + 1)) + ")";
    ++i;
    if (semi == std::string_view::npos) break;
    params.remove_prefix(semi + 1);
  }
  return msg;
}

// batch entries: nb = params / (P + 1); a run of equal param rows is one call
template <typename T>
size_t run_end(const T *p, size_t per, size_t b, size_t nb, const T *av, size_t aper) {
  size_t e = b + 1;
  while (e < nb && std::memcmp(p + e * per, p + b * per, per * sizeof(T)) == 0 &&
         (aper == 0 || std::memcmp(av + e * aper, av + b * aper, aper * sizeof(T)) == 0))
    ++e;
  return e;
}

template <typename T>
ffi::Error elementwise(ffi::AnyBuffer x, ffi::AnyBuffer t, ffi::AnyBuffer prm, int64_t fn, int64_t soft,
                       int64_t P, bool hess, std::string_view name, std::string_view params, T *a, T *b) {
  const T *xp = x.typed_data<T>(), *tp = t.typed_data<T>(), *pp = prm.typed_data<T>();
  size_t per = P + 1, nb = prm.element_count() / per, total = x.element_count();
  size_t chunk = nb ? total / nb : 0;
  for (size_t s = 0; s < nb;) {
    size_t e = run_end<T>(pp, per, s, nb, nullptr, 0);
    size_t off = s * chunk, n = (e - s) * chunk;
    int rc = call_ew<T>(fn, P, hess, n, xp + off, tp + off, pp + s * per, a + off, hess ? nullptr : b + off);
    if (rc == kElabel && soft) rc = call_ew<T>(soft, P, hess, n, xp + off, tp + off, pp + s * per, a + off,
                                              hess ? nullptr : b + off);
    if (rc == kElabel)
      return error(name, rc, std::string(soft ? "targets must hold values in [0, 1] (labels or soft targets), found "
                                              : "targets must hold labels 0 or 1, found ") +
                                 first_bad(tp + off, n, soft != 0) + " (this kernel " +
                                 (soft ? "falls back to its soft version for values in (0, 1))" : "takes no soft targets)"));
    if (rc == kEinval) return error(name, rc, einval<T>(params, pp + s * per, ""));
    if (rc != kOk) return error(name, rc, "error code " + std::to_string(rc));
    s = e;
  }
  return ffi::Error::Success();
}

ffi::Error EwImpl(ffi::AnyBuffer x, ffi::AnyBuffer t, ffi::AnyBuffer prm, int64_t fn, int64_t soft, int64_t P,
                  std::string_view name, std::string_view params, ffi::Result<ffi::AnyBuffer> loss, ffi::Result<ffi::AnyBuffer> grad) {
  if (x.element_type() == ffi::DataType::F32)
    return elementwise<float>(x, t, prm, fn, soft, P, false, name, params, loss->typed_data<float>(), grad->typed_data<float>());
  if (x.element_type() == ffi::DataType::F64)
    return elementwise<double>(x, t, prm, fn, soft, P, false, name, params, loss->typed_data<double>(), grad->typed_data<double>());
  return ffi::Error::InvalidArgument("derive kernel: logits must be float32 or float64");
}

ffi::Error EwHessImpl(ffi::AnyBuffer x, ffi::AnyBuffer t, ffi::AnyBuffer prm, int64_t fn, int64_t soft, int64_t P,
                      std::string_view name, std::string_view params, ffi::Result<ffi::AnyBuffer> hess) {
  if (x.element_type() == ffi::DataType::F32)
    return elementwise<float>(x, t, prm, fn, soft, P, true, name, params, hess->typed_data<float>(), nullptr);
  if (x.element_type() == ffi::DataType::F64)
    return elementwise<double>(x, t, prm, fn, soft, P, true, name, params, hess->typed_data<double>(), nullptr);
  return ffi::Error::InvalidArgument("derive kernel: logits must be float32 or float64");
}

// class index rows; a = loss/v, b = grad/out
template <typename T>
ffi::Error rows_ci(ffi::AnyBuffer x, ffi::AnyBuffer tg, ffi::AnyBuffer prm, ffi::AnyBuffer av, int64_t fn,
                   int64_t P, bool class_alpha, bool alpha_vec, int64_t ign, bool hvp, std::string_view name,
                   std::string_view params, const T *v, T *a, T *b) {
  auto dims = x.dimensions();
  size_t k = dims.size() ? dims[dims.size() - 1] : 1;
  const T *xp = x.typed_data<T>(), *pp = prm.typed_data<T>(), *ap = av.typed_data<T>();
  size_t per = P + 1, nb = prm.element_count() / per, nrows = k ? x.element_count() / k : tg.element_count();
  size_t aper = alpha_vec ? k : 0;
  size_t chunk = nb ? nrows / nb : 0;
  std::vector<int64_t> wide;
  const int64_t *tp;
  if (tg.element_type() == ffi::DataType::S64) {
    tp = tg.typed_data<int64_t>();
  } else if (tg.element_type() == ffi::DataType::S32) {
    const int32_t *narrow = tg.typed_data<int32_t>();
    wide.assign(narrow, narrow + tg.element_count());
    tp = wide.data();
  } else {
    return error(name, kEinval, "targets must be int32 or int64 class indices");
  }
  for (size_t s = 0; s < nb;) {
    size_t e = run_end<T>(pp, per, s, nb, ap, aper);
    size_t r0 = s * chunk, n = (e - s) * chunk;
    int rc = hvp ? call_ci<T, const T *, T *>(fn, P, class_alpha, n, k, xp + r0 * k, tp + r0,
                                              alpha_vec ? ap + s * aper : nullptr, pp + s * per, ign, v + r0 * k, b + r0 * k)
                 : call_ci<T, T *, T *>(fn, P, class_alpha, n, k, xp + r0 * k, tp + r0,
                                        alpha_vec ? ap + s * aper : nullptr, pp + s * per, ign, a + r0, b + r0 * k);
    if (rc == kEinval) {
      for (size_t i = r0; i < r0 + n; ++i)
        if (tp[i] != ign && (tp[i] < 0 || (size_t)tp[i] >= k))
          return error(name, rc, "targets must be class indices in [0, " + std::to_string(k) + ")" +
                                     (ign == INT64_MIN ? std::string("") : " or ignore_index " + std::to_string(ign)) +
                                     ", found " + std::to_string(tp[i]) + " at row " + std::to_string(i));
      return error(name, rc, einval<T>(params, pp + s * per, " (or a per-class alpha outside [0, 1])"));
    }
    if (rc != kOk) return error(name, rc, "error code " + std::to_string(rc));
    s = e;
  }
  return ffi::Error::Success();
}

template <typename T>
ffi::Error rows_cp(ffi::AnyBuffer x, ffi::AnyBuffer q, ffi::AnyBuffer prm, int64_t fn, int64_t P, bool hvp,
                   std::string_view name, std::string_view params, const T *v, T *a, T *b) {
  auto dims = x.dimensions();
  size_t k = dims.size() ? dims[dims.size() - 1] : 1;
  const T *xp = x.typed_data<T>(), *qp = q.typed_data<T>(), *pp = prm.typed_data<T>();
  size_t per = P + 1, nb = prm.element_count() / per, nrows = k ? x.element_count() / k : 0;
  size_t chunk = nb ? nrows / nb : 0;
  for (size_t s = 0; s < nb;) {
    size_t e = run_end<T>(pp, per, s, nb, nullptr, 0);
    size_t r0 = s * chunk, n = (e - s) * chunk;
    int rc = hvp ? call_cp<T, const T *, T *>(fn, P, n, k, xp + r0 * k, qp + r0 * k, pp + s * per, v + r0 * k, b + r0 * k)
                 : call_cp<T, T *, T *>(fn, P, n, k, xp + r0 * k, qp + r0 * k, pp + s * per, a + r0, b + r0 * k);
    if (rc == kElabel)
      return error(name, rc, "targets must hold class probabilities in [0, 1], found " + first_bad(qp + r0 * k, n * k, true));
    if (rc == kEinval) return error(name, rc, einval<T>(params, pp + s * per, ""));
    if (rc != kOk) return error(name, rc, "error code " + std::to_string(rc));
    s = e;
  }
  return ffi::Error::Success();
}

#define DERIVE_DTYPE(x, CALL_F, CALL_D)                                   \
  if ((x).element_type() == ffi::DataType::F32) { using T = float; return CALL_F; } \
  if ((x).element_type() == ffi::DataType::F64) { using T = double; return CALL_D; } \
  return ffi::Error::InvalidArgument("derive kernel: logits must be float32 or float64");

ffi::Error CiImpl(ffi::AnyBuffer x, ffi::AnyBuffer tg, ffi::AnyBuffer prm, ffi::AnyBuffer av, int64_t fn, int64_t P,
                  bool class_alpha, bool alpha_vec, int64_t ign, std::string_view name, std::string_view params,
                  ffi::Result<ffi::AnyBuffer> loss, ffi::Result<ffi::AnyBuffer> grad) {
  DERIVE_DTYPE(x, (rows_ci<T>(x, tg, prm, av, fn, P, class_alpha, alpha_vec, ign, false, name, params, nullptr,
                              loss->typed_data<T>(), grad->typed_data<T>())),
               (rows_ci<T>(x, tg, prm, av, fn, P, class_alpha, alpha_vec, ign, false, name, params, nullptr,
                           loss->typed_data<T>(), grad->typed_data<T>())))
}
ffi::Error CiHvpImpl(ffi::AnyBuffer x, ffi::AnyBuffer tg, ffi::AnyBuffer prm, ffi::AnyBuffer av, ffi::AnyBuffer v,
                     int64_t fn, int64_t P, bool class_alpha, bool alpha_vec, int64_t ign, std::string_view name, std::string_view params,
                     ffi::Result<ffi::AnyBuffer> out) {
  DERIVE_DTYPE(x, (rows_ci<T>(x, tg, prm, av, fn, P, class_alpha, alpha_vec, ign, true, name, params, v.typed_data<T>(),
                              nullptr, out->typed_data<T>())),
               (rows_ci<T>(x, tg, prm, av, fn, P, class_alpha, alpha_vec, ign, true, name, params, v.typed_data<T>(),
                           nullptr, out->typed_data<T>())))
}
ffi::Error CpImpl(ffi::AnyBuffer x, ffi::AnyBuffer q, ffi::AnyBuffer prm, int64_t fn, int64_t P, std::string_view name, std::string_view params,
                  ffi::Result<ffi::AnyBuffer> loss, ffi::Result<ffi::AnyBuffer> grad) {
  DERIVE_DTYPE(x, (rows_cp<T>(x, q, prm, fn, P, false, name, params, nullptr, loss->typed_data<T>(), grad->typed_data<T>())),
               (rows_cp<T>(x, q, prm, fn, P, false, name, params, nullptr, loss->typed_data<T>(), grad->typed_data<T>())))
}
ffi::Error CpHvpImpl(ffi::AnyBuffer x, ffi::AnyBuffer q, ffi::AnyBuffer prm, ffi::AnyBuffer v, int64_t fn, int64_t P,
                     std::string_view name, std::string_view params, ffi::Result<ffi::AnyBuffer> out) {
  DERIVE_DTYPE(x, (rows_cp<T>(x, q, prm, fn, P, true, name, params, v.typed_data<T>(), nullptr, out->typed_data<T>())),
               (rows_cp<T>(x, q, prm, fn, P, true, name, params, v.typed_data<T>(), nullptr, out->typed_data<T>())))
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(derive_jax_elementwise, EwImpl,
    ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
        .Attr<int64_t>("fn").Attr<int64_t>("soft").Attr<int64_t>("nparams").Attr<std::string_view>("name").Attr<std::string_view>("params")
        .Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(derive_jax_elementwise_hess, EwHessImpl,
    ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
        .Attr<int64_t>("fn").Attr<int64_t>("soft").Attr<int64_t>("nparams").Attr<std::string_view>("name").Attr<std::string_view>("params")
        .Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(derive_jax_class_index, CiImpl,
    ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
        .Attr<int64_t>("fn").Attr<int64_t>("nparams").Attr<bool>("class_alpha").Attr<bool>("alpha_vec")
        .Attr<int64_t>("ignore_index").Attr<std::string_view>("name").Attr<std::string_view>("params")
        .Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(derive_jax_class_index_hvp, CiHvpImpl,
    ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
        .Arg<ffi::AnyBuffer>()
        .Attr<int64_t>("fn").Attr<int64_t>("nparams").Attr<bool>("class_alpha").Attr<bool>("alpha_vec")
        .Attr<int64_t>("ignore_index").Attr<std::string_view>("name").Attr<std::string_view>("params")
        .Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(derive_jax_class_probs, CpImpl,
    ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
        .Attr<int64_t>("fn").Attr<int64_t>("nparams").Attr<std::string_view>("name").Attr<std::string_view>("params")
        .Ret<ffi::AnyBuffer>().Ret<ffi::AnyBuffer>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(derive_jax_class_probs_hvp, CpHvpImpl,
    ffi::Ffi::Bind().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>().Arg<ffi::AnyBuffer>()
        .Attr<int64_t>("fn").Attr<int64_t>("nparams").Attr<std::string_view>("name").Attr<std::string_view>("params")
        .Ret<ffi::AnyBuffer>());
"""

SHIM_FLAGS = ("-std=c++17", "-O2", "-fPIC", "-shared")
#: the FFI targets the shim defines and registers (its exported handler symbols)
TARGETS = ("derive_jax_elementwise", "derive_jax_elementwise_hess", "derive_jax_class_index",
           "derive_jax_class_index_hvp", "derive_jax_class_probs", "derive_jax_class_probs_hvp")
MAX_PARAMS = 6  # the arities the shim instantiates (DERIVE_ARITY)
NO_IGNORE = -(2 ** 63)  # the ignore label of losses without one (no int64 class index equals it)
_BACKENDS = ("auto", "ffi", "callback")


class JaxFFIUnavailableWarning(RuntimeWarning):
    """``backend="auto"`` runs the kernels through ``jax.pure_callback`` (NumPy kernels) because
    the FFI shim or the C library cannot be built or loaded."""


def _jax():
    try:
        import jax
    except ImportError:  # pragma: no cover - the tests skip without jax
        raise ImportError("derive.jax needs JAX: pip install 'derive-gradients[jax]' (or pip install jax)") from None
    return jax


# ------------------------------------------------------------------------------------------
# the FFI shim: compiled, cached and checked like the C kernels (derive.runtime.cbuild)


def find_cxx() -> list:
    """The C++ compiler command: ``$CXX`` (may carry arguments), else c++, g++, clang++."""
    env = os.environ.get("CXX")
    if env:
        try:
            cmd = shlex.split(env)
        except ValueError as exc:
            raise cbuild.CompilerNotFoundError(f"the C++ compiler CXX={env!r} cannot be parsed ({exc})") from None
        if cmd and (shutil.which(cmd[0]) or Path(cmd[0]).is_file()):
            return cmd
        raise cbuild.CompilerNotFoundError(f"the C++ compiler CXX={env!r} was not found")
    for name in ("c++", "g++", "clang++"):
        path = shutil.which(name)
        if path:
            return [path]
    raise cbuild.CompilerNotFoundError("no C++ compiler found (looked for $CXX, c++, g++, clang++) for the "
                                       "XLA FFI shim of derive.jax")


def shim_path() -> Path:
    """The cached shim library (built when missing or failing its SHA-256 check)."""
    jax = _jax()
    import jaxlib

    cmd = find_cxx()
    include = Path(jax.ffi.include_dir())
    h = hashlib.sha256(SHIM_SOURCE.encode())
    h.update("\0".join((*SHIM_FLAGS, str(include), jaxlib.__version__, cbuild.compiler_version(cmd),
                        os.uname().machine if hasattr(os, "uname") else "")).encode())
    for header in ("ffi.h", "api.h", "c_api.h"):
        h.update(cbuild._file_hash(include / "xla" / "ffi" / "api" / header))
    folder = cbuild._private_cache_dir(cbuild.cache_dir())
    path = folder / f"libderive_jax_ffi_{h.hexdigest()[:24]}{cbuild._lib_suffix()}"
    if cbuild.verify_entry(path):
        return path
    with tempfile.TemporaryDirectory(prefix="derive-jax-") as tmp:
        src = Path(tmp) / "derive_jax_ffi.cc"
        src.write_text(SHIM_SOURCE)
        out = Path(tmp) / "shim.so"
        args = [*cmd, *SHIM_FLAGS, "-isystem", str(include), str(src), "-o", str(out)]
        try:
            res = subprocess.run(args, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as exc:
            raise cbuild.BuildError(f"cannot run the C++ compiler {cmd[0]!r}: {exc}") from None
        if res.returncode != 0:
            raise cbuild.BuildError("compiling the XLA FFI shim of derive.jax failed:\n$ "
                                    + " ".join(map(shlex.quote, args)) + "\n" + (res.stderr or res.stdout))
        data = out.read_bytes()
    try:
        cbuild._write_atomic(cbuild.digest_path(path), (hashlib.sha256(data).hexdigest() + "\n").encode())
        cbuild._write_atomic(path, data)
        os.chmod(path, 0o755)
    except OSError as exc:
        raise cbuild.BuildError(f"cannot write the FFI shim into {folder}: {exc.strerror or exc}") from None
    if not cbuild.verify_entry(path):
        raise cbuild.BuildError(f"{path} does not match its recorded SHA-256 after it was built")
    return path


_LOCK = threading.Lock()
_FFI: dict = {}  # "shim" -> the loaded shim, or the BuildError that stops it


def _shim_ready():
    """Build, load and register the shim once per process; the exception when it cannot be."""
    with _LOCK:
        if "shim" not in _FFI:
            try:
                jax = _jax()
                lib = ctypes.cdll.LoadLibrary(str(shim_path()))
                for name in TARGETS:
                    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, name)), platform="cpu")
                _FFI["shim"] = lib
            except (cbuild.BuildError, OSError, AttributeError) as exc:
                _FFI["shim"] = exc if isinstance(exc, cbuild.BuildError) else cbuild.BuildError(str(exc))
        return _FFI["shim"]


_WARNED: set = set()


def _resolve(backend, src):
    """"ffi" or "callback" for the generated module ``src`` = (folder, module)."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, _BACKENDS))}, got {backend!r}")
    if backend == "callback":
        return backend
    why = _shim_ready()
    if not isinstance(why, cbuild.BuildError):
        try:
            cbuild.load(*src)
            return "ffi"
        except cbuild.BuildError as exc:
            why = exc
    if backend == "ffi":
        raise why
    if src not in _WARNED:
        _WARNED.add(src)
        warnings.warn(f"derive.jax: running {src[1]} through jax.pure_callback and the NumPy kernels (same "
                      f"results, slower) because the FFI path cannot be built: {why}", JaxFFIUnavailableWarning,
                      stacklevel=4)
    return "callback"


def _address(src, symbol) -> int:
    lib = cbuild.load(*src)
    return ctypes.cast(getattr(lib, symbol), ctypes.c_void_p).value


# ------------------------------------------------------------------------------------------
# one kernel: its declaration (from the generated module's KERNELS table) and its raw calls


class Kernel:
    """A kernel of a generated module, as derive.jax calls it (hashable: a static argument)."""

    def __init__(self, name, src, info, defaults):
        self.name, self.src, self.info = name, (Path(src[0]), src[1]), info
        self.params = tuple(info["params"])
        self.defaults = dict(defaults)
        self.layout = ("elementwise" if info["kind"] == "elementwise" else
                       "class_probs" if info.get("target") == "class_probs" else "class_index")
        self.class_alpha = bool(info["class_alpha"])
        self.soft = info.get("soft")
        # what the shim cannot call, said when the kernel is called (the other kernels still load)
        self.unsupported = (
            f"kernel {name!r} has {len(self.params)} parameters; derive.jax calls kernels of at most {MAX_PARAMS}"
            if len(self.params) > MAX_PARAMS else
            f"kernel {name!r}: derive.jax needs a per-class alpha to be the kernel's first parameter"
            if self.class_alpha and self.params[0] != "alpha" else None)

    def __repr__(self):
        return f"<derive.jax kernel {self.name} of {self.src[1]}>"

    def numpy(self):
        return cbuild.load_numpy_module(*self.src)


def _dt(dtype) -> str:
    return "f32" if np.dtype(dtype) == np.float32 else "f64"


def _ffi_call(target, shapes, *ops, **attrs):
    jax = _jax()
    return jax.ffi.ffi_call(target, shapes, vmap_method="broadcast_all")(*ops, **attrs)


def _attrs(k, dt, second):
    suffix = {"": "", "hess": "_hess", "hvp": "_hvp"}[second]
    attrs = {"fn": np.int64(_address(k.src, f"derive_{k.name}{suffix}_{dt}")), "nparams": np.int64(len(k.params)),
             "name": k.name, "params": ";".join(f"{p}:{losses._describe(k.info['domains'][p])}"
                                                + (" (or < 0: no weighting)" if p in k.info["no_weight_below_zero"] else "")
                                                for p in k.params)}
    if k.layout == "elementwise":
        attrs["soft"] = np.int64(_address(k.src, f"derive_{k.soft}{suffix}_{dt}") if k.soft else 0)
    return attrs


def raw_pair(k, backend, x, t, prm, av, ignore_index, alpha_vec):
    """(loss, grad) of kernel ``k`` in one call, without derivative rules (see :func:`functions`).
    ``prm``: the P scalar parameters and a 0; ``av``: the per-class alpha (K,) when ``alpha_vec``,
    else one unused value (class-index kernels only)."""
    jax = _jax()
    lshape = x.shape if k.layout == "elementwise" else x.shape[:-1]
    shapes = (jax.ShapeDtypeStruct(lshape, x.dtype), jax.ShapeDtypeStruct(x.shape, x.dtype))
    if backend == "callback":
        host = functools.partial(_host, k, "", ignore_index, alpha_vec)
        return tuple(jax.pure_callback(host, shapes, x, t, prm, av, vmap_method="broadcast_all"))
    attrs = _attrs(k, _dt(x.dtype), "")
    if k.layout == "elementwise":
        return tuple(_ffi_call("derive_jax_elementwise", shapes, x, t, prm, **attrs))
    if k.layout == "class_probs":
        return tuple(_ffi_call("derive_jax_class_probs", shapes, x, t, prm, **attrs))
    return tuple(_ffi_call("derive_jax_class_index", shapes, x, t, prm, av, class_alpha=k.class_alpha,
                           alpha_vec=bool(alpha_vec), ignore_index=np.int64(ignore_index), **attrs))


def raw_second(k, backend, x, t, prm, av, v, ignore_index, alpha_vec):
    """Elementwise: the second derivative d grad / dx per element (``v`` is None); softmax: the
    Hessian-vector product H v per row (the proved hess/hvp kernels of the file)."""
    jax = _jax()
    shape = (jax.ShapeDtypeStruct(x.shape, x.dtype),)
    second = "hess" if k.layout == "elementwise" else "hvp"
    if backend == "callback":
        host = functools.partial(_host, k, second, ignore_index, alpha_vec)
        ops = (x, t, prm, av) if v is None else (x, t, prm, av, v)
        return jax.pure_callback(host, shape, *ops, vmap_method="broadcast_all")[0]
    attrs = _attrs(k, _dt(x.dtype), second)
    if k.layout == "elementwise":
        return _ffi_call("derive_jax_elementwise_hess", shape, x, t, prm, **attrs)[0]
    if k.layout == "class_probs":
        return _ffi_call("derive_jax_class_probs_hvp", shape, x, t, prm, v, **attrs)[0]
    return _ffi_call("derive_jax_class_index_hvp", shape, x, t, prm, av, v, class_alpha=k.class_alpha,
                     alpha_vec=bool(alpha_vec), ignore_index=np.int64(ignore_index), **attrs)[0]


# ------------------------------------------------------------------------------------------
# the pure_callback backend: the generated NumPy kernels, with the checks the C kernels make


def _check_targets(k, t, kernel_soft):
    if k.layout == "class_probs" or kernel_soft:
        bad = ~((t >= 0) & (t <= 1))
        if bad.any():
            what = "class probabilities" if k.layout == "class_probs" else "values"
            raise ValueError(f"derive kernel {k.name}: targets must hold {what} in [0, 1], found "
                             f"{t.reshape(-1)[bad.reshape(-1)][0]!r}")
        return "soft"
    binary = (t == 0) | (t == 1)
    if binary.all():
        return "binary"
    if k.soft:
        return _check_targets(k, t, True) and "fallback"
    raise ValueError(f"derive kernel {k.name}: targets must hold labels 0 or 1, found "
                     f"{t.reshape(-1)[~binary.reshape(-1)][0]!r} (this kernel takes no soft targets)")


def _host(k, second, ignore_index, alpha_vec, x, t, prm, av, v=None):
    """The NumPy kernel on one callback's arrays, batch entries (leading axes, read off ``prm``)
    one at a time (eager pure_callback hands jax Arrays: NumPy arrays are made first)."""
    x, t, prm, av = (np.asarray(a) for a in (x, t, prm, av))
    v = None if v is None else np.asarray(v)
    mod, dt = k.numpy(), _dt(x.dtype)
    per = len(k.params) + 1
    nb = prm.size // per
    prm = prm.reshape(nb, per)
    rows = k.layout != "elementwise"
    kk = x.shape[-1] if rows else 1
    xb = x.reshape(nb, -1, kk) if rows else x.reshape(nb, -1)
    tb = t.reshape(nb, -1, kk) if k.layout == "class_probs" else t.reshape(nb, -1)
    avb = av.reshape(nb, -1)
    vb = None if v is None else v.reshape(xb.shape)
    loss = np.empty(xb.shape[:2], x.dtype)
    out = np.empty(xb.shape, x.dtype)
    for b in range(nb):
        p = [float(q) for q in prm[b, :-1]]
        for name, val in zip(k.params, p):
            if not losses._in_domain(val, k.info["domains"][name]) and not (
                    name in k.info["no_weight_below_zero"] and val < 0):
                raise ValueError(f"derive kernel {k.name}: {name} must be {losses._describe(k.info['domains'][name])}"
                                 f", got {val:g}")
        name = k.name
        if k.layout == "elementwise":
            kind = _check_targets(k, tb[b], k.info.get("target") == "soft")
            if kind == "fallback":
                name = k.soft
            args = (xb[b], tb[b], *p)
        elif k.layout == "class_probs":
            _check_targets(k, tb[b], True)
            args = (xb[b], tb[b], *p)
        else:
            tg = tb[b].astype(np.int64)
            bad = (tg != ignore_index) & ((tg < 0) | (tg >= kk))
            if bad.any():
                raise ValueError(f"derive kernel {k.name}: targets must be class indices in [0, {kk})"
                                 + ("" if ignore_index == NO_IGNORE else f" or ignore_index {ignore_index}")
                                 + f", found {tg[bad][0]}")
            if k.class_alpha:
                a = avb[b].astype(x.dtype) if alpha_vec else p[0]
                p = [a] + p[1:]
            args = (xb[b], tg, *p, ignore_index)
        if second:
            out[b] = getattr(mod, f"{name}_{second}_{dt}")(*args, *(() if vb is None else (vb[b],)))
        else:
            loss[b], out[b] = getattr(mod, f"{name}_{dt}")(*args)
    out = out.reshape(x.shape)
    return out if second else (loss.reshape(x.shape[:-1] if rows else x.shape), out)


# ------------------------------------------------------------------------------------------
# derivative rules


def _third(name):
    return NotImplementedError(f"derive.jax: a third derivative of kernel {name!r} was asked for; the derivation "
                               "files prove the first and second derivatives only")


def _refuse(k, what, tangents):
    """A tangent for the targets or parameters: not derived, so an error rather than a zero."""
    jax = _jax()
    for name, tan in zip(what, tangents):
        if tan is not None and not isinstance(tan, jax.custom_derivatives.SymbolicZero):
            raise NotImplementedError(
                f"derive.jax.{k.name}: differentiating with respect to {name} is not supported (the kernels "
                f"differentiate the loss with respect to the logits only); wrap {name} in jax.lax.stop_gradient")


@functools.lru_cache(maxsize=None)
def _hvp_primitive():
    """``derive_hvp``: the softmax Hessian-vector product as a primitive that jax can transpose
    (linear in v, H symmetric: the transpose is the same product) and batch."""
    jax = _jax()
    from jax.extend.core import Primitive
    from jax.interpreters import ad, batching, mlir

    prim = Primitive("derive_hvp")

    def impl(x, t, prm, av, v, *, k, backend, ignore_index, alpha_vec):
        return raw_second(k, backend, x, t, prm, av, v, ignore_index, alpha_vec)

    prim.def_impl(impl)
    prim.def_abstract_eval(lambda x, t, prm, av, v, **kw: jax.core.ShapedArray(v.shape, v.dtype))
    mlir.register_lowering(prim, mlir.lower_fun(impl, multiple_results=False))

    def jvp(primals, tangents, **kw):
        if any(type(d) is not ad.Zero for d in tangents[:4]):
            raise _third(kw["k"].name)
        out = prim.bind(*primals, **kw)
        dv = tangents[4]
        return out, (ad.Zero.from_primal_value(out) if type(dv) is ad.Zero else prim.bind(*primals[:4], dv, **kw))

    def transpose(ct, x, t, prm, av, v, **kw):
        if any(ad.is_undefined_primal(a) for a in (x, t, prm, av)):
            raise _third(kw["k"].name)
        if type(ct) is ad.Zero:
            return None, None, None, None, ad.Zero(v.aval)
        return None, None, None, None, prim.bind(x, t, prm, av, ct, **kw)

    def batch(args, dims, **kw):
        import jax.numpy as jnp

        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        moved = [jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
                 for a, d in zip(args, dims)]
        return prim.bind(*moved, **kw), 0

    ad.primitive_jvps[prim] = jvp
    ad.primitive_transposes[prim] = transpose
    batching.primitive_batchers[prim] = batch
    return prim


def _instantiate(tan, like):
    jax = _jax()
    if isinstance(tan, jax.custom_derivatives.SymbolicZero):
        return jax.numpy.zeros(like.shape, like.dtype)
    return tan


@functools.lru_cache(maxsize=None)
def core(k, backend, ignore_index, alpha_vec, names=("inputs", "targets")):
    """``loss(x, t, prm, av)``: the kernel's loss with its proved derivatives in x (see the module
    docstring); x in float32 or float64, t, prm and av as :func:`raw_pair` takes them."""
    jax = _jax()
    jnp = jax.numpy
    rows = k.layout != "elementwise"
    what = (names[1], "the parameters (" + ", ".join(k.params) + ")", "alpha")

    @jax.custom_jvp
    def hess(x, t, prm, av):
        return raw_second(k, backend, x, t, prm, av, None, ignore_index, alpha_vec)

    @functools.partial(hess.defjvp, symbolic_zeros=True)
    def _hess_jvp(primals, tangents):
        raise _third(k.name)

    def dot(g, dx):
        return jnp.sum(g * dx, axis=-1) if rows else g * dx

    @jax.custom_jvp
    def pair(x, t, prm, av):
        return raw_pair(k, backend, x, t, prm, av, ignore_index, alpha_vec)

    @functools.partial(pair.defjvp, symbolic_zeros=True)
    def _pair_jvp(primals, tangents):
        x, t, prm, av = primals
        _refuse(k, what, tangents[1:])
        dx = _instantiate(tangents[0], x)
        if not k.info.get("second"):
            raise NotImplementedError(
                f"derive.jax: kernel {k.name!r} (module {k.src[1]!r}) declares no second derivative (no hess, "
                "dcoef or d2term key in its [[kernel]] table), so jax.hessian, grad of grad and jvp of grad "
                "are not available for it (a first derivative is)")
        loss, g = pair(x, t, prm, av)  # (a third derivative reaches hess / hvp, which refuse it)
        if rows:
            dg = _hvp_primitive().bind(x, t, prm, av, dx, k=k, backend=backend, ignore_index=ignore_index,
                                       alpha_vec=alpha_vec)
        else:
            dg = hess(x, t, prm, av) * dx
        return (loss, g), (dot(g, dx), dg)

    @jax.custom_jvp
    def loss(x, t, prm, av):
        return raw_pair(k, backend, x, t, prm, av, ignore_index, alpha_vec)[0]

    @functools.partial(loss.defjvp, symbolic_zeros=True)
    def _loss_jvp(primals, tangents):
        x = primals[0]
        _refuse(k, what, tangents[1:])
        value, g = pair(*primals)
        return value, dot(g, _instantiate(tangents[0], x))

    return loss


# ------------------------------------------------------------------------------------------
# the public functions: arguments checked and converted, then core()


def _concrete(value):
    """``value`` as a Python float or NumPy array when it is known now, else None (a tracer)."""
    jax = _jax()
    if isinstance(value, jax.core.Tracer):
        return None
    arr = np.asarray(value)
    return arr.item() if arr.ndim == 0 else arr


def _compute_dtype(x, label):
    jnp = _jax().numpy
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{label} must be a floating-point array (float32, float64, float16 or bfloat16), "
                        f"got dtype {x.dtype}")
    return x.dtype if x.dtype in (np.float32, np.float64) else np.dtype(np.float32)


def prepare(k, inputs, targets, values, names=("inputs", "targets")):
    """The checked arguments of kernel ``k``: (x, t, scalars, av, alpha_vec, static), converted
    and broadcast later by :func:`_compiled` (one jitted step, so that an eager call costs one
    dispatch).  ``values``: parameter name -> value (a number or a JAX scalar; a per-class alpha:
    None, a number or K values).  Known values are checked against the file's domains here
    (ValueError naming the parameter); traced ones by the kernel (an error when the call runs)."""
    jax = _jax()
    jnp = jax.numpy
    x = jnp.asarray(inputs)
    cd = _compute_dtype(x, names[0])
    if k.layout != "elementwise" and x.ndim < 1:
        raise ValueError(f"{names[0]} must have at least one axis (the classes, last), got a 0-d array")
    t = jnp.asarray(targets)
    if k.layout == "class_index":
        if not jnp.issubdtype(t.dtype, jnp.integer):
            raise TypeError(f"{names[1]} must hold integer class indices, got dtype {t.dtype}")
        want = x.shape[:-1]
        tdt = jnp.int64 if jax.config.jax_enable_x64 else jnp.int32
    else:
        if not (jnp.issubdtype(t.dtype, jnp.number) or t.dtype == jnp.bool_):
            raise TypeError(f"{names[1]} must be numeric, got dtype {t.dtype}")
        want, tdt = x.shape, cd
    try:
        ok = np.broadcast_shapes(t.shape, want) == tuple(want)
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"{names[1]} has shape {t.shape}, which does not broadcast to {want} (the shape of "
                         f"{names[0]}{'' if k.layout == 'elementwise' else ' without its last axis'})")
    scalars, av, alpha_vec = [], None, False
    for name in k.params:
        value = values[name]
        if k.class_alpha and name == "alpha":
            known = None if value is None else _concrete(value)
            if value is not None and jnp.ndim(value) > 0:
                if jnp.shape(value) != (x.shape[-1],):
                    raise ValueError(f"alpha must be None, a number or one weight per class ({x.shape[-1]}), "
                                     f"got shape {jnp.shape(value)}")
                if known is not None and not ((known >= 0) & (known <= 1)).all():
                    raise ValueError(f"alpha must hold weights in [0, 1], got {known!r}")
                av, alpha_vec, value = value, True, 1.0
            elif value is None:
                value = 1.0
            elif known is not None:
                losses._param(k.info, name, known)
        else:
            known = _concrete(value)
            if known is not None:
                if isinstance(known, np.ndarray):
                    raise ValueError(f"{name} must be a number, got an array of shape {known.shape}")
                losses._param(k.info, name, known, allow_off=name in k.info["no_weight_below_zero"])
        scalars.append(value)
    return x, t, tuple(scalars), av, alpha_vec, (np.dtype(cd), np.dtype(tdt), tuple(want))


@functools.lru_cache(maxsize=None)
def _compiled(k, backend, ignore_index, alpha_vec, names, static):
    """The step of :func:`evaluate` and its jitted version: conversions, broadcast, parameters
    stacked (P values and a 0), :func:`core`, the loss in the input dtype."""
    jax = _jax()
    jnp = jax.numpy
    cd, tdt, want = static
    fn = core(k, backend, ignore_index, alpha_vec, names)

    def step(x, t, scalars, av):
        prm = jnp.stack([*(jnp.asarray(v, cd) for v in scalars), jnp.zeros((), cd)])
        av = jnp.asarray(av, cd) if alpha_vec else jnp.zeros((1,), cd)
        return fn(x.astype(cd), jnp.broadcast_to(t.astype(tdt), want), prm, av).astype(x.dtype)
    return step, jax.jit(step)


def evaluate(k, inputs, targets, values, *, ignore_index=NO_IGNORE, backend="auto", names=("inputs", "targets")):
    """The per-element (elementwise) or per-row (softmax, classes on the last axis) loss of
    kernel ``k``, differentiable in ``inputs`` to second order, in the dtype of ``inputs``."""
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, (int, np.integer)):
        raise TypeError(f"ignore_index must be an integer, got {type(ignore_index).__name__}")
    if k.unsupported:
        raise NotImplementedError(k.unsupported)
    x, t, scalars, av, alpha_vec, static = prepare(k, inputs, targets, values, names)
    step, jitted = _compiled(k, _resolve(backend, k.src), int(ignore_index), alpha_vec, tuple(names), static)
    args = (x, t, scalars, 0.0 if av is None else av)
    # an eager call (no tracer): one compiled dispatch instead of op-by-op; inside a transformation
    # (jit, grad, vmap) the steps are traced into the caller's computation as they are
    traced = any(isinstance(a, _jax().core.Tracer) for a in (x, t, av, *scalars))
    return (step if traced else jitted)(*args)


def _function(k, signature, doc):
    """The public function of kernel ``k`` with the signature of derive.kernels.<kernel> less its
    NumPy-only arguments (reduction, return_grad, threads, out)."""
    import inspect

    P = inspect.Parameter
    keep = [p for p in signature.parameters.values() if p.name not in ("reduction", "return_grad", "threads", "out",
                                                                      "backend")]
    keep.append(P("backend", P.KEYWORD_ONLY, default="auto"))
    sig = signature.replace(parameters=keep)

    def kernel(*args, **kwargs):
        a = sig.bind(*args, **kwargs)
        a.apply_defaults()
        a = a.arguments
        return evaluate(k, a["inputs"], a["targets"], {p: a[p] for p in k.params},
                        ignore_index=a.get("ignore_index", NO_IGNORE), backend=a["backend"])

    kernel.__name__ = kernel.__qualname__ = k.name
    kernel.__signature__ = sig
    kernel.__doc__ = doc
    return kernel


def _doc(k, loaded_doc):
    first = (loaded_doc or k.info["title"]).split("\n")[0]
    axis = ("inputs : float array (float32, float64; float16 and bfloat16 computed in float32), any shape\n"
            "targets : broadcastable to inputs: " + ("values in [0, 1]" if k.info.get("target") == "soft" else
                                                     "labels 0 or 1" + (f" (or soft targets in [0, 1]: kernel {k.soft!r})"
                                                                        if k.soft else ""))
            if k.layout == "elementwise" else
            "inputs : float array (..., K): the classes on the LAST axis (JAX's convention)\n"
            + ("targets : class probabilities in [0, 1], shape of inputs" if k.layout == "class_probs" else
               "targets : integer class indices in [0, K), shape inputs.shape[:-1] (or ignore_index: loss 0, "
               "gradient 0)"))
    return (f"{first}\n\nJAX version of derive.kernels.{k.name} (kernel {k.name!r} of module {k.src[1]!r}): "
            f"the loss per {'element' if k.layout == 'elementwise' else 'row'}, no reduction; jit, vmap, "
            "grad, jvp and second derivatives (hessian, grad of grad) in the logits work; targets and "
            "parameters are not differentiated (a tangent for them raises).\n\n" + axis
            + "\n" + "\n".join(f"{p} : default {k.defaults.get(p)!r}" for p in k.params)
            + "\nbackend : 'auto' (XLA FFI, else jax.pure_callback), 'ffi' or 'callback'")


class JaxKernels:
    """derive.jax versions of the kernels of derivation files: one function per kernel."""

    def __init__(self, loaded):
        """``loaded``: a derive LoadedKernels (``derive.load(FILE)``, ``derive.shipped()``)."""
        self._what = repr(loaded)
        self._names = []
        self._kernels = {}
        for module, names in loaded.modules.items():
            table = cbuild.load_numpy_module(loaded.generated, module).KERNELS
            for name in names:
                fn = getattr(loaded, name)
                defaults = {p.name: p.default for p in fn.__signature__.parameters.values()
                            if p.default is not p.empty}
                k = Kernel(name, (loaded.generated, module), table[name], defaults)
                self._kernels[name] = k
                self._names.append(name)
                setattr(self, name, _function(k, fn.__signature__, _doc(k, fn.__doc__)))

    @property
    def kernel_names(self) -> list:
        return list(self._names)

    def kernel(self, name) -> Kernel:
        """The :class:`Kernel` (declaration and source) of one function."""
        return self._kernels[name]

    def __repr__(self):
        return f"<derive.jax {self._what[1:-1]}>"

    def __dir__(self):
        return sorted(set(super().__dir__()) | set(self._names))


_SHIPPED: dict = {}


def shipped() -> JaxKernels:
    """Every kernel of the shipped derivation files (``derive.jax.kernels``)."""
    if "all" not in _SHIPPED:
        from derive.runtime import kernel_files

        _SHIPPED["all"] = JaxKernels(kernel_files.shipped())
    return _SHIPPED["all"]


def load(path, **kwargs) -> JaxKernels:
    """The kernels of the derivation file ``path`` (verified and generated by ``derive.load``)."""
    from derive.runtime import kernel_files

    return JaxKernels(kernel_files.load(path, **kwargs))


__all__ = ["JaxKernels", "Kernel", "JaxFFIUnavailableWarning", "shipped", "load", "evaluate", "core", "prepare",
           "raw_pair", "raw_second", "shim_path", "find_cxx", "SHIM_SOURCE", "TARGETS", "NO_IGNORE"]
