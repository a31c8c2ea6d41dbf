"""The CUDA implementations of derive's PyTorch ops: ``register_kernel("cuda", ...)`` on each op of
:class:`derive.runtime.torch_ops.KernelOps`, calling the generated CUDA launchers
(``generated/<module>.cu``, built by :mod:`derive.runtime.cudabuild`) on the tensors' data pointers, on
torch's current stream of their device.

The op's schema, fake (meta) implementation and autograd (``dx = g_loss * grad``, double backward through
the second op) are the ones the CPU path registers, so torch.compile, gradcheck and gradgradcheck work the
same on CUDA tensors.  float32 and float64 compute in their own type; float16 and bfloat16 tensors are
read and written as they are, computed in float32 (scalars and per-class weights in float32).

Errors, one line each: the inputs on different devices, of unsupported dtypes or shapes; a label, target
or class index outside its set (found by the kernel's flags, then located with torch as on the CPU); a
parameter outside its domain (the launcher's check); a failed launch (the CUDA error's name and text).
Reading the flags waits for the kernel (one small device-to-host copy per call).
"""
from __future__ import annotations

import ctypes

import torch

from derive.runtime import cudabuild, losses

_OK, _EINVAL, _ELABEL, _ECUDA = 0, 1, 2, 3
_DT = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}
_SCALAR = {"f32": ctypes.c_float, "f16": ctypes.c_float, "bf16": ctypes.c_float, "f64": ctypes.c_double}
_SOFT_PROBE = 4096  # as torch_ops: targets looked at before a binary kernel that has a soft version

_FUNCS: dict = {}


def _cfunc(src, cname, kinds, sd):
    """The launcher ``cname`` of the module src = (folder, module), declared from ``kinds`` (see
    torch_ops._cfunc) plus the flags pointer and the stream."""
    key = (src, cname)
    entry = _FUNCS.get(key)
    if entry is None:
        lib = cudabuild.load(*src)
        types = {"n": ctypes.c_size_t, "p": ctypes.c_void_p, "f": _SCALAR[sd], "i": ctypes.c_int64}
        try:
            fn = lib[cname]
        except AttributeError:
            raise cudabuild.CudaBuildError(f"the CUDA kernels of {src[1]} define no {cname}: regenerate them") from None
        fn.argtypes = [types[k] for k in kinds] + [ctypes.c_void_p, ctypes.c_void_p]
        fn.restype = ctypes.c_int
        entry = _FUNCS[key] = (lib, fn)
    return entry


def _check(x, others, op):
    """The storage dtype of x (a CUDA tensor), after checking that the other tensors are on its device."""
    sd = _DT.get(x.dtype)
    if sd is None:
        raise TypeError(f"{op}: x must be float32, float64, float16 or bfloat16, got {x.dtype}")
    for name, t in others:
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device}, but x is on {x.device}")
    return sd


def _launch(ko, kernel, second, sd, x, args):
    """Run the launcher for ``kernel`` on x's device and current stream; the flags (two ints) after it."""
    suffix = f"_{ko.second}" if second else ""
    lib, fn = _cfunc(ko.src, f"derive_{kernel}{suffix}_{sd}_cuda", ko._kinds(second), sd)
    flags = torch.zeros(2, dtype=torch.int32, device=x.device)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    rc = fn(*args, flags.data_ptr(), stream)
    if rc == _ECUDA:
        code = lib.derive_cuda_last_error()
        raise RuntimeError(f"{ko.qualname}: launching the CUDA kernel {kernel}{suffix} on {x.device} failed: "
                           f"{lib.derive_cuda_error_string(code).decode()} (cudaError {code})")
    if rc != _OK:
        return rc, None
    return rc, flags.tolist()  # waits for the kernel


def _elementwise(ko, x, t, params, second):
    op = ko.qualname
    sd = _check(x, [("t", t)], op)
    if tuple(t.shape) != tuple(x.shape):
        raise ValueError(f"{op}: t has shape {tuple(t.shape)}, but x has shape {tuple(x.shape)}")
    if t.dtype.is_complex or not (t.dtype.is_floating_point or t.dtype in (torch.bool, torch.uint8, torch.int8,
                                                                           torch.int16, torch.int32, torch.int64)):
        raise TypeError(f"{op}: t must hold numeric targets, got dtype {t.dtype}")
    x = x.contiguous()
    t = t.to(x.dtype).contiguous()
    outs = [torch.empty_like(x)] if second else [torch.empty_like(x), torch.empty_like(x)]
    n = x.numel()

    def run(kernel):
        return _launch(ko, kernel, second, sd, x, [n, x.data_ptr(), t.data_ptr(), *params,
                                                   *[o.data_ptr() for o in outs]])

    kernel = ko.name
    flat = t.reshape(-1)
    if ko.soft and n > _SOFT_PROBE and bool(_not_binary(flat[:_SOFT_PROBE]).any()):
        kernel = ko.soft
    rc, flags = run(kernel)
    if rc == _OK and flags[0]:  # as torch_ops: a label outside {0, 1}, or a target outside [0, 1]
        soft = ko.info.get("target") == "soft" or kernel == ko.soft
        if not soft and ko.soft is None:
            raise losses._binary_error(ko.info, "targets", _first(_not_binary(t), t))
        bad = ~((t >= 0) & (t <= 1))  # NaN included
        if bool(bad.any()):
            raise losses._soft_error("targets", _first(bad, t))
        if not soft:  # soft targets for a kernel that has a soft version: run that one
            kernel = ko.soft
            rc, flags = run(kernel)
        if rc == _OK and flags[0]:
            raise RuntimeError(f"{op}: the CUDA kernel {kernel} flagged a target that torch finds in [0, 1]")
    if rc != _OK:
        raise ValueError(f"{op}: the CUDA kernel {kernel} rejected its arguments (code {rc}; parameters {params})")
    return outs[0] if second else (outs[0], outs[1])


def _rows(ko, x, target, alpha_vec, params, ignore_index, second, v=None):
    op = ko.qualname
    sd = _check(x, [("target" if ko.layout == "class_index" else "q", target), ("v", v)], op)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be (M, K) rows, got shape {tuple(x.shape)}")
    x = x.contiguous()
    m, k = x.shape
    scalar_dtype = torch.float64 if sd == "f64" else torch.float32
    if ko.layout == "class_probs":
        if tuple(target.shape) != tuple(x.shape):
            raise ValueError(f"{op}: q has shape {tuple(target.shape)}, but x has shape {tuple(x.shape)}")
        if not target.dtype.is_floating_point:
            raise TypeError(f"{op}: q must hold class probabilities (floats), got dtype {target.dtype}")
        target = target.to(x.dtype).contiguous()
        tail = []
    else:
        if target.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"{op}: target must hold integer class indices, got dtype {target.dtype}")
        if tuple(target.shape) != (m,):
            raise ValueError(f"{op}: target must have shape ({m},) (one class index per row of x), "
                             f"got {tuple(target.shape)}")
        target = target.to(torch.int64).contiguous()
        if alpha_vec is not None:
            if tuple(alpha_vec.shape) != (k,):
                raise ValueError(f"{op}: the per-class weights must have shape ({k},), one per class, "
                                 f"got {tuple(alpha_vec.shape)}")
            alpha_vec = alpha_vec.to(device=x.device, dtype=scalar_dtype).contiguous()  # k values: a small copy
        tail = [ignore_index]
    c_params = []
    for p, value in zip(ko.params, params):
        c_params += [alpha_vec.data_ptr() if alpha_vec is not None else None, value] if (
            ko.class_alpha and p == "alpha") else [value]
    if second:
        if tuple(v.shape) != tuple(x.shape):
            raise ValueError(f"{op}: v has shape {tuple(v.shape)}, but x has shape {tuple(x.shape)}")
        v = v.to(x.dtype).contiguous()
        outs = [v, torch.empty_like(x)]
    else:
        outs = [torch.empty((m,), dtype=x.dtype, device=x.device), torch.empty_like(x)]
    rc, flags = _launch(ko, ko.name, second, sd, x, [m, k, x.data_ptr(), target.data_ptr(), *c_params, *tail,
                                                     *[o.data_ptr() for o in outs]])
    if rc == _OK and (flags[0] or flags[1]):
        if ko.layout == "class_probs":
            bad = ~((target >= 0) & (target <= 1))
            if bool(bad.any()):
                raise ValueError(f"{op}: q must hold class probabilities in [0, 1], found {_first(bad, target)!r}")
        else:
            bad = (target != ignore_index) & ((target < 0) | (target >= k))
            if bool(bad.any()):
                raise ValueError(f"{op}: target must hold class indices in [0, {k}) or ignore_index={ignore_index}, "
                                 f"found {_first(bad, target)}")
            if alpha_vec is not None:
                bad = ~((alpha_vec >= 0) & (alpha_vec <= 1))
                if bool(bad.any()):
                    raise ValueError(f"{op}: the per-class weights (alpha) must be in [0, 1] for every class, "
                                     f"found {_first(bad, alpha_vec)!r}")
        rc = _EINVAL
    if rc != _OK:
        raise ValueError(f"{op}: the CUDA kernel {ko.name} rejected its arguments (code {rc}; parameters {params})")
    return outs[1] if second else (outs[0], outs[1])


def _not_binary(t):
    return ~((t == 0) | (t == 1))


def _first(mask, values):
    return values.reshape(-1)[mask.reshape(-1).nonzero()[0, 0]].item()


def _guarded(fn):
    """``fn`` run with x's device as the current CUDA device (launchers use the current device)."""
    def impl(*args):
        with torch.cuda.device(args[0].device):
            return fn(*args)
    return impl


def register(ko) -> None:
    """Register the CUDA implementations of ``ko``'s ops (a torch_ops.KernelOps)."""

    def forward(*args):
        x, target, alpha_vec, params, ii, _ = ko._split(args)
        if ko.layout == "elementwise":
            return _elementwise(ko, x, target, params, False)
        return _rows(ko, x, target, alpha_vec, params, ii, False)

    ko.op.register_kernel("cuda", _guarded(forward))
    if ko.op2 is not None:
        def second(*args):
            x, target, alpha_vec, params, ii, v = ko._split(args)
            if ko.layout == "elementwise":
                return _elementwise(ko, x, target, params, True)
            return _rows(ko, x, target, alpha_vec, params, ii, True, v)

        ko.op2.register_kernel("cuda", _guarded(second))


__all__ = ["register"]
