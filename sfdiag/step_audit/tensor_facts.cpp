/* What the checks' module (`plain_squares.c`) reads of a tensor, through torch's own C++
 * API: a tensor's dtype, layout, device, contiguity, size and address, a parameter's grad
 * and a tensor's version, each a field read where torch's Python attributes cost ~50 ns a
 * call (eight of them a grad, two or three reads a step of `sfdiag run`).
 *
 * A shared library of three C functions (no Python module), built against the torch that
 * runs (`torch_reads.py`: once per torch, in the background, kept in sfdiag's cache); the
 * checks' module calls them for tensors of exactly torch.Tensor (and torch.nn.Parameter)
 * and asks torch's Python attributes as before for anything else. Each answers what the
 * attribute would: the same decisions, the same kernel, the same bits.
 */
#include <Python.h>
#include <torch/csrc/autograd/python_variable.h>

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

/* `t` must be a torch.Tensor (its exact type: the caller checks). 1: `*out` filled in;
 * 0: not answered here (a nested tensor, one without storage, or torch raised): the caller
 * asks the Python attributes, which say what they say. No Python error is left set. */
int sfdiag_tensor_facts(PyObject *t, sfdiag_facts *out) noexcept {
    try {
        const at::Tensor &x = THPVariable_Unpack(t);
        if (x.is_nested() || !x.has_storage())
            return 0;
        switch (x.scalar_type()) {
        case at::kFloat:
            out->dtype = 0;
            break;
        case at::kBFloat16:
            out->dtype = 1;
            break;
        case at::kHalf:
            out->dtype = 2;
            break;
        default:
            out->dtype = -1;
        }
        out->strided = x.layout() == at::kStrided;
        out->cpu = x.is_cpu();
        out->contiguous = out->strided && x.is_contiguous();
        out->numel = x.numel();
        out->data = out->strided && out->cpu && out->contiguous ? x.data_ptr() : nullptr;
        return 1;
    } catch (...) {
        return 0;
    }
}

/* `param` must be a torch.Tensor or torch.nn.Parameter (exactly: the caller checks; their
 * `grad` getter is torch's own). 1: `*grad` is a new reference to its grad (None where it
 * has none, as `param.grad` gives it) and `*version` the grad's version counter (0: none);
 * -1: a Python error is set; 0: not answered here (the caller asks `param.grad`). */
int sfdiag_grad_of(PyObject *param, PyObject **grad, long long *version) noexcept {
    try {
        const at::Tensor &p = THPVariable_Unpack(param);
        if (!p.is_leaf())
            return 0; /* (torch warns of a non-leaf's grad: as a Python warning, there) */
        const at::Tensor &g = p.grad();
        if (!g.defined()) {
            Py_INCREF(Py_None);
            *grad = Py_None;
            *version = 0;
            return 1;
        }
        PyObject *wrapped = THPVariable_Wrap(g);
        if (wrapped == nullptr)
            return -1;
        *grad = wrapped;
        *version = (long long)g._version();
        return 1;
    } catch (...) {
        if (PyErr_Occurred())
            PyErr_Clear();
        return 0;
    }
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
