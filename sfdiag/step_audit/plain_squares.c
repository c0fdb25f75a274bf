/* `fused.plain_squares_host` in one C call: the CPython extension module
 * `_sfdiag_plain_squares`, built beside the kernel's library (`fused.py`) where Python's
 * headers are there to build it (else Python runs the same checks).
 *
 * Every tensor is checked as the Python path checks it (of type torch.Tensor where asked,
 * one dtype the kernel reads, strided, on the CPU, contiguous, at most `max_elements`
 * elements), by torch's own attributes and methods, and its address and size are gathered;
 * then the kernel's squares function (`fused_read.c`, its address given by `configure`)
 * sums each one's squares: the same function, the same bits. Without Python between the
 * tensors, a read of two grads costs the host a third of the Python path's, one of a
 * thousand a third less a tensor: what every `sfdiag run` step pays two or three times.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef void (*squares_fn)(int64_t, const void *const *, const int64_t *, double *);

#define DTYPES 3 /* float32, bfloat16, float16: `fused._SQUARES`' order */
#define ON_STACK 64
/* above this many elements in all, the sums run with the GIL released (a ctypes call did) */
#define GIL_FREE_ELEMENTS (1 << 18)

static PyObject *tensor_type, *strided, *dtypes[DTYPES];
static squares_fn functions[DTYPES];
static int64_t max_elements = -1; /* -1: not configured */
static PyObject *name_dtype, *name_layout, *name_is_cpu, *name_is_contiguous, *name_numel,
    *name_data_ptr, *name_grad, *name_version;

/* configure(tensor_type, strided, dtypes, addresses, max_elements): torch's objects the
 * checks compare with, and each dtype's squares function (its address, or None). */
static PyObject *configure(PyObject *self, PyObject *args) {
    PyObject *type, *layout, *dtype_tuple, *address_tuple;
    long long most;
    if (!PyArg_ParseTuple(args, "OOO!O!L", &type, &layout, &PyTuple_Type, &dtype_tuple,
                          &PyTuple_Type, &address_tuple, &most))
        return NULL;
    if (PyTuple_GET_SIZE(dtype_tuple) != DTYPES || PyTuple_GET_SIZE(address_tuple) != DTYPES) {
        PyErr_SetString(PyExc_ValueError, "three dtypes and three addresses expected");
        return NULL;
    }
    squares_fn found[DTYPES];
    for (int k = 0; k < DTYPES; k++) {
        PyObject *address = PyTuple_GET_ITEM(address_tuple, k);
        found[k] = address == Py_None ? NULL : (squares_fn)PyLong_AsVoidPtr(address);
        if (PyErr_Occurred())
            return NULL;
    }
    if (name_dtype == NULL) {
        name_dtype = PyUnicode_InternFromString("dtype");
        name_layout = PyUnicode_InternFromString("layout");
        name_is_cpu = PyUnicode_InternFromString("is_cpu");
        name_is_contiguous = PyUnicode_InternFromString("is_contiguous");
        name_numel = PyUnicode_InternFromString("numel");
        name_data_ptr = PyUnicode_InternFromString("data_ptr");
        name_grad = PyUnicode_InternFromString("grad");
        name_version = PyUnicode_InternFromString("_version");
        if (!name_dtype || !name_layout || !name_is_cpu || !name_is_contiguous || !name_numel ||
            !name_data_ptr || !name_grad || !name_version)
            return NULL;
    }
    Py_INCREF(type);
    Py_XSETREF(tensor_type, type);
    Py_INCREF(layout);
    Py_XSETREF(strided, layout);
    for (int k = 0; k < DTYPES; k++) {
        PyObject *dtype = PyTuple_GET_ITEM(dtype_tuple, k);
        Py_INCREF(dtype);
        Py_XSETREF(dtypes[k], dtype);
        functions[k] = found[k];
    }
    max_elements = most;
    Py_RETURN_NONE;
}

/* The attribute `name` of `t` is `expected` (1), is not (0), or raised (-1). */
static int attribute_is(PyObject *t, PyObject *name, PyObject *expected) {
    PyObject *value = PyObject_GetAttr(t, name);
    if (value == NULL)
        return -1;
    Py_DECREF(value); /* (compared by identity only: torch's dtypes and layouts live on) */
    return value == expected;
}

/* The int `t.name()` returns, into *out: 1, or -1 where it raised. */
static int method_int(PyObject *t, PyObject *name, long long *out) {
    PyObject *value = PyObject_CallMethodNoArgs(t, name);
    if (value == NULL)
        return -1;
    *out = PyLong_AsLongLong(value);
    Py_DECREF(value);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 1;
}

/* One tensor's checks: 1 where the kernel reads it (its dtype's index into *which, the same
 * for every tensor of the call), 0 where it does not, -1 where torch raised. */
static int check(PyObject *t, int check_type, int *which, long long *size) {
    if (check_type && (PyObject *)Py_TYPE(t) != tensor_type)
        return 0;
    PyObject *dtype = PyObject_GetAttr(t, name_dtype);
    if (dtype == NULL)
        return -1;
    Py_DECREF(dtype);
    if (*which < 0) {
        for (int k = 0; k < DTYPES; k++)
            if (dtype == dtypes[k])
                *which = k;
        if (*which < 0 || functions[*which] == NULL)
            return 0;
    } else if (dtype != dtypes[*which]) {
        return 0;
    }
    int ok = attribute_is(t, name_layout, strided);
    if (ok != 1)
        return ok;
    ok = attribute_is(t, name_is_cpu, Py_True);
    if (ok != 1)
        return ok;
    PyObject *contiguous = PyObject_CallMethodNoArgs(t, name_is_contiguous);
    if (contiguous == NULL)
        return -1;
    Py_DECREF(contiguous);
    if (contiguous != Py_True)
        return 0;
    if (method_int(t, name_numel, size) < 0)
        return -1;
    return *size <= max_elements;
}

/* squares(tensors, out, check_type) -> bool: each tensor's float64 sum of squares into
 * `out` (a writable buffer of at least 8 bytes a tensor), where every one is what the kernel
 * reads (True); else False and `out` untouched. */
static PyObject *squares(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "squares(tensors, out, check_type)");
        return NULL;
    }
    if (max_elements < 0) {
        PyErr_SetString(PyExc_RuntimeError, "configure() first");
        return NULL;
    }
    int check_type = PyObject_IsTrue(args[2]);
    if (check_type < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(args[0], "a sequence of tensors expected");
    if (seq == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    Py_buffer out;
    if (PyObject_GetBuffer(args[1], &out, PyBUF_WRITABLE) < 0) {
        Py_DECREF(seq);
        return NULL;
    }
    const void *pointers_here[ON_STACK];
    int64_t sizes_here[ON_STACK];
    const void **pointers = pointers_here;
    int64_t *sizes = sizes_here;
    PyObject *result = NULL;
    if (out.len < count * (Py_ssize_t)sizeof(double)) {
        PyErr_SetString(PyExc_ValueError, "out holds fewer doubles than there are tensors");
        goto done;
    }
    if (count > ON_STACK) {
        pointers = PyMem_Malloc(count * sizeof(*pointers));
        sizes = PyMem_Malloc(count * sizeof(*sizes));
        if (pointers == NULL || sizes == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    int which = -1;
    long long total = 0;
    /* every tensor checked before any address is read: as the Python path, whose checks
     * keep a tensor without storage (sparse) from data_ptr() */
    for (Py_ssize_t i = 0; i < count; i++) {
        long long size = 0;
        int ok = check(items[i], check_type, &which, &size);
        if (ok < 0)
            goto done;
        if (ok == 0) {
            result = Py_NewRef(Py_False);
            goto done;
        }
        sizes[i] = size;
        total += size;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *address = PyObject_CallMethodNoArgs(items[i], name_data_ptr);
        if (address == NULL)
            goto done;
        pointers[i] = PyLong_AsVoidPtr(address);
        Py_DECREF(address);
        if (PyErr_Occurred())
            goto done;
    }
    if (count > 0) {
        squares_fn function = functions[which];
        if (total > GIL_FREE_ELEMENTS) {
            Py_BEGIN_ALLOW_THREADS function(count, pointers, sizes, (double *)out.buf);
            Py_END_ALLOW_THREADS
        } else {
            function(count, pointers, sizes, (double *)out.buf);
        }
    }
    result = Py_NewRef(Py_True);
done:
    if (pointers != pointers_here)
        PyMem_Free(pointers);
    if (sizes != sizes_here)
        PyMem_Free(sizes);
    PyBuffer_Release(&out);
    Py_DECREF(seq);
    return result;
}

/* grads(params) -> (grads, versions, plain): each param's grad (None where it has none),
 * the grad's version counter (0: none), and whether every grad is there, a torch.Tensor
 * (no subclass). What `sfdiag run` reads of a thousand grads two or three times a step. */
static PyObject *grads(PyObject *self, PyObject *params) {
    if (max_elements < 0) {
        PyErr_SetString(PyExc_RuntimeError, "configure() first");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(params, "a sequence of parameters expected");
    if (seq == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *found = PyList_New(count), *versions = PyList_New(count);
    int plain = 1;
    if (found == NULL || versions == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *grad = PyObject_GetAttr(items[i], name_grad);
        if (grad == NULL)
            goto fail;
        PyList_SET_ITEM(found, i, grad);
        PyObject *version;
        if (grad == Py_None) {
            plain = 0;
            version = PyLong_FromLong(0);
        } else {
            if ((PyObject *)Py_TYPE(grad) != tensor_type)
                plain = 0;
            version = PyObject_GetAttr(grad, name_version);
        }
        if (version == NULL)
            goto fail;
        PyList_SET_ITEM(versions, i, version);
    }
    Py_DECREF(seq);
    return Py_BuildValue("(NNO)", found, versions, plain ? Py_True : Py_False);
fail:
    Py_XDECREF(found);
    Py_XDECREF(versions);
    Py_DECREF(seq);
    return NULL;
}

/* weakrefs(objects) -> list: a weak reference to each (None for None). */
static PyObject *weakrefs(PyObject *self, PyObject *objects) {
    PyObject *seq = PySequence_Fast(objects, "a sequence expected");
    if (seq == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *out = PyList_New(count);
    if (out == NULL)
        goto fail;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *ref = items[i] == Py_None ? Py_NewRef(Py_None) : PyWeakref_NewRef(items[i], NULL);
        if (ref == NULL)
            goto fail;
        PyList_SET_ITEM(out, i, ref);
    }
    Py_DECREF(seq);
    return out;
fail:
    Py_XDECREF(out);
    Py_DECREF(seq);
    return NULL;
}

static PyMethodDef methods[] = {
    {"configure", configure, METH_VARARGS, "torch's objects and the squares functions"},
    {"squares", (PyCFunction)(void (*)(void))squares, METH_FASTCALL,
     "squares(tensors, out, check_type) -> bool"},
    {"grads", grads, METH_O, "grads(params) -> (grads, versions, plain)"},
    {"weakrefs", weakrefs, METH_O, "weakrefs(objects) -> list"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_sfdiag_plain_squares", NULL, -1,
                                    methods};

PyMODINIT_FUNC PyInit__sfdiag_plain_squares(void) { return PyModule_Create(&module); }
