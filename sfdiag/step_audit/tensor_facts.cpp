/* What the checks' module (`plain_squares.c`) reads of many tensors, through torch's own
 * C++ API: each tensor's dtype, layout, device, contiguity, size and address, each param's
 * grad and the grad's version, and a tensor's version: a field read each, where torch's
 * Python attributes cost ~50 ns a call (eight of them a grad, two or three reads a step of
 * `sfdiag run`).
 *
 * A shared library of three C functions (no Python module), built against the torch that
 * runs (`torch_reads.py`: once per torch, in the background, kept in sfdiag's cache); the
 * checks' module calls them for tensors of exactly torch.Tensor (params: or
 * torch.nn.Parameter) and asks torch's Python attributes as before for anything else. Each
 * answers what the attribute would: the same decisions, the same kernel, the same bits.
 *
 * After an optimizer's step a thousand tensors' metadata is out of the caches: a read is a
 * chain of dependent loads a tensor (the Python object, its TensorImpl, its autograd meta,
 * the grad's TensorImpl, its version counter). The batches walk each link for every tensor
 * before the next one, prefetching ahead, so that the misses of many tensors overlap:
 * 2,000 grads read cold 0.45–0.50 → 0.18–0.21 ms.
 */
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

#include <vector>

namespace {

void prefetch_lines(const void *address, int lines) {
    for (int k = 0; k < lines; k++)
        __builtin_prefetch(static_cast<const char *>(address) + 64 * k);
}

} // namespace

extern "C" {

/* One tensor's facts (`plain_squares.c` declares the same struct). */
struct sfdiag_facts {
    int dtype; /* 0 float32, 1 bfloat16, 2 float16 (`fused._SQUARES`' order); -1 another */
    int strided;
    int cpu;
    int contiguous;
    long long numel;
    const void *data; /* read only where it is strided, on the CPU and contiguous */
};

/* The facts of each `tensors[i]` where `eligible[i]` (the caller checked its type is exactly
 * torch.Tensor) into `out[i]`, `answered[i]` 1; else, and where this cannot tell (a nested
 * tensor, one without storage, torch raised), `answered[i]` 0: the caller asks the Python
 * attributes, which say what they say. No Python error is set. */
void sfdiag_tensor_facts(PyObject *const *tensors, const char *eligible, Py_ssize_t n,
                         sfdiag_facts *out, char *answered) noexcept {
    for (Py_ssize_t i = 0; i < n; i++)
        answered[i] = 0;
    std::vector<c10::TensorImpl *> impls;
    try {
        impls.assign(n, nullptr);
    } catch (...) { /* (no memory for the batch: none answered) */
        return;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (eligible[i]) {
            impls[i] = THPVariable_Unpack(tensors[i]).unsafeGetTensorImpl();
            prefetch_lines(impls[i], 4);
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (impls[i] == nullptr)
            continue;
        try {
            const at::Tensor &x = THPVariable_Unpack(tensors[i]);
            if (x.is_nested() || !x.has_storage())
                continue;
            sfdiag_facts &f = out[i];
            switch (x.scalar_type()) {
            case at::kFloat:
                f.dtype = 0;
                break;
            case at::kBFloat16:
                f.dtype = 1;
                break;
            case at::kHalf:
                f.dtype = 2;
                break;
            default:
                f.dtype = -1;
            }
            f.strided = x.layout() == at::kStrided;
            f.cpu = x.is_cpu();
            f.contiguous = f.strided && x.is_contiguous();
            f.numel = x.numel();
            f.data = f.strided && f.cpu && f.contiguous ? x.data_ptr() : nullptr;
            answered[i] = 1;
        } catch (...) {
        }
    }
}

/* Each `params[i]`'s grad where `eligible[i]` (the caller checked its type is exactly
 * torch.Tensor or torch.nn.Parameter, whose `grad` is torch's own getter) and it is a leaf
 * (torch warns of a non-leaf's grad: as a Python warning, there): `grads[i]` a new reference
 * to it (None where it has none, as `param.grad` gives it), `versions[i]` its version
 * counter (0: none), `answered[i]` 1; else `answered[i]` 0 (the caller asks `param.grad`).
 * 0, or -1 where a Python error is set (the references of those still answered are the
 * caller's to release). */
int sfdiag_grads_of(PyObject *const *params, const char *eligible, Py_ssize_t n,
                    PyObject **grads, long long *versions, char *answered) noexcept {
    for (Py_ssize_t i = 0; i < n; i++)
        answered[i] = 0;
    std::vector<c10::TensorImpl *> grad_impls;
    std::vector<char> leaf;
    try {
        grad_impls.assign(n, nullptr);
        leaf.assign(n, 0);
    } catch (...) { /* (no memory for the batch: none answered) */
        return 0;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (eligible[i])
            prefetch_lines(THPVariable_Unpack(params[i]).unsafeGetTensorImpl(), 4);
    }
    for (Py_ssize_t i = 0; i < n; i++) { /* the autograd metas, every one asked for */
        if (!eligible[i])
            continue;
        try {
            const at::Tensor &p = THPVariable_Unpack(params[i]);
            leaf[i] = p.is_leaf();
            c10::AutogradMetaInterface *meta = p.unsafeGetTensorImpl()->autograd_meta();
            if (meta != nullptr)
                prefetch_lines(meta, 2);
        } catch (...) {
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) { /* the grads, every one asked for */
        if (!leaf[i])
            continue;
        try {
            const at::Tensor &g = THPVariable_Unpack(params[i]).grad();
            if (g.defined()) {
                grad_impls[i] = g.unsafeGetTensorImpl();
                prefetch_lines(grad_impls[i], 4);
            }
            answered[i] = 1;
        } catch (...) {
        }
    }
    for (Py_ssize_t i = 0; i < n; i++) { /* their version counters */
        if (grad_impls[i] != nullptr)
            versions[i] = (long long)grad_impls[i]->version_counter().current_version();
    }
    for (Py_ssize_t i = 0; i < n; i++) { /* their Python objects */
        if (!answered[i])
            continue;
        if (grad_impls[i] == nullptr) {
            Py_INCREF(Py_None);
            grads[i] = Py_None;
            versions[i] = 0;
            continue;
        }
        try {
            grads[i] = THPVariable_Wrap(THPVariable_Unpack(params[i]).grad());
        } catch (...) {
            grads[i] = nullptr;
        }
        if (grads[i] == nullptr) {
            answered[i] = 0;
            if (PyErr_Occurred()) {
                for (Py_ssize_t j = i + 1; j < n; j++)
                    answered[j] = 0; /* (none of theirs taken yet) */
                return -1;
            }
        }
    }
    return 0;
}

/* `t` must be a torch.Tensor (exactly: the caller checks). 1: `*version` is its version
 * counter, as `t._version` gives it; 0: not answered here. */
int sfdiag_version_of(PyObject *t, long long *version) noexcept {
    try {
        *version = (long long)THPVariable_Unpack(t)._version();
        return 1;
    } catch (...) {
        return 0;
    }
}

} /* extern "C" */
