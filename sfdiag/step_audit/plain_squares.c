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
 *
 * Where `tensor_facts.cpp` was built for the torch that runs (`torch_reads.py`), `use_fast`
 * hands its three functions over: a tensor of exactly torch.Tensor (a param of it or of
 * torch.nn.Parameter) is then read through torch's C++ API, a tenth of the cost; any other
 * goes through its Python attributes as before. The same facts, the same decisions.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

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

/* `tensor_facts.cpp`'s (the same struct) */
struct sfdiag_facts {
    int dtype; /* an index into `dtypes`; -1 another */
    int strided, cpu, contiguous;
    long long numel;
    const void *data;
};
typedef void (*facts_fn)(PyObject *const *, const char *, Py_ssize_t, struct sfdiag_facts *,
                         char *);
typedef int (*grads_fn)(PyObject *const *, const char *, Py_ssize_t, PyObject **, long long *,
                        char *);
typedef int (*version_fn)(PyObject *, long long *);
static facts_fn fast_facts;
static grads_fn fast_grads;
static version_fn fast_version;
static PyObject *parameter_type; /* its `grad` is torch's own getter: read fast too */

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

/* The fast path's answer (`check`'s): the same checks in the same order, on the facts. */
static int judged(const struct sfdiag_facts *f, int *which, long long *size) {
    if (*which < 0) {
        if (f->dtype < 0 || functions[f->dtype] == NULL)
            return 0;
        *which = f->dtype;
    } else if (f->dtype != *which) {
        return 0;
    }
    if (!f->strided || !f->cpu || !f->contiguous)
        return 0;
    *size = f->numel;
    return f->numel <= max_elements;
}

/* One tensor's checks: 1 where the kernel reads it (its dtype's index into *which, the same
 * for every tensor of the call; its address into *data where `facts`, read through torch's
 * C++ API, gave it, else NULL), 0 where it does not, -1 where torch raised. `facts`: NULL
 * where there are none (the Python attributes are asked). */
static int check(PyObject *t, int check_type, int *which, long long *size, const void **data,
                 const struct sfdiag_facts *facts) {
    if (check_type && (PyObject *)Py_TYPE(t) != tensor_type)
        return 0;
    *data = NULL;
    if (facts != NULL) {
        int ok = judged(facts, which, size);
        if (ok == 1)
            *data = facts->data;
        return ok;
    }
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

/* Free `array` where it is not the stack's `here` (more tensors than fit there). */
static void release(const void *array, const void *here) {
    if (array != here)
        PyMem_Free((void *)array);
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
    char eligible_here[ON_STACK], answered_here[ON_STACK];
    struct sfdiag_facts facts_here[ON_STACK];
    const void **pointers = pointers_here;
    int64_t *sizes = sizes_here; /* (a pointer not NULL: read already, by the fast path) */
    char *eligible = eligible_here, *answered = answered_here;
    struct sfdiag_facts *facts = facts_here;
    PyObject *result = NULL;
    if (out.len < count * (Py_ssize_t)sizeof(double)) {
        PyErr_SetString(PyExc_ValueError, "out holds fewer doubles than there are tensors");
        goto done;
    }
    if (count > ON_STACK) {
        pointers = PyMem_Malloc(count * sizeof(*pointers));
        sizes = PyMem_Malloc(count * sizeof(*sizes));
        eligible = PyMem_Malloc(count);
        answered = PyMem_Malloc(count);
        facts = PyMem_Malloc(count * sizeof(*facts));
        if (pointers == NULL || sizes == NULL || eligible == NULL || answered == NULL ||
            facts == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    int which = -1;
    long long total = 0;
    int any_fast = 0;
    if (fast_facts != NULL) { /* every plain tensor's facts in one batch (see tensor_facts.cpp) */
        for (Py_ssize_t i = 0; i < count; i++)
            any_fast |= eligible[i] = (PyObject *)Py_TYPE(items[i]) == tensor_type;
        if (any_fast)
            fast_facts(items, eligible, count, facts, answered);
    }
    /* every tensor checked before any address is read: as the Python path, whose checks
     * keep a tensor without storage (sparse) from data_ptr() */
    for (Py_ssize_t i = 0; i < count; i++) {
        long long size = 0;
        const void *data = NULL;
        int ok = check(items[i], check_type, &which, &size, &data,
                       any_fast && answered[i] ? &facts[i] : NULL);
        if (ok < 0)
            goto done;
        if (ok == 0) {
            result = Py_NewRef(Py_False);
            goto done;
        }
        sizes[i] = size;
        pointers[i] = data;
        total += size;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        if (pointers[i] != NULL)
            continue;
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
    release(pointers, pointers_here);
    release(sizes, sizes_here);
    release(eligible, eligible_here);
    release(answered, answered_here);
    release(facts, facts_here);
    PyBuffer_Release(&out);
    Py_DECREF(seq);
    return result;
}

/* `sequence` as a fast sequence (a new reference), once `configure` has run; NULL with an
 * error set where it has not or `sequence` is none. */
static PyObject *configured_sequence(PyObject *sequence, const char *message) {
    if (max_elements < 0) {
        PyErr_SetString(PyExc_RuntimeError, "configure() first");
        return NULL;
    }
    return PySequence_Fast(sequence, message);
}

/* grads(params) -> (grads, versions, plain): each param's grad (None where it has none),
 * the grad's version counter (0: none), and whether every grad is there, a torch.Tensor
 * (no subclass). What `sfdiag run` reads of a thousand grads two or three times a step. */
static PyObject *grads(PyObject *self, PyObject *params) {
    PyObject *seq = configured_sequence(params, "a sequence of parameters expected");
    if (seq == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *found = PyList_New(count), *versions = PyList_New(count), *result = NULL;
    PyObject **fast_found = NULL; /* the batch's grads (see tensor_facts.cpp), where asked */
    long long *counters = NULL;
    char *eligible = NULL, *answered = NULL;
    Py_ssize_t next = 0; /* the first of the batch's references not in `found` yet */
    int plain = 1;
    if (found == NULL || versions == NULL)
        goto done;
    if (fast_grads != NULL && count > 0) {
        fast_found = PyMem_Malloc(count * sizeof(*fast_found));
        counters = PyMem_Malloc(count * sizeof(*counters));
        eligible = PyMem_Malloc(count);
        answered = PyMem_Calloc(count, 1);
        if (fast_found == NULL || counters == NULL || eligible == NULL || answered == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        int any = 0;
        for (Py_ssize_t i = 0; i < count; i++) {
            PyObject *type = (PyObject *)Py_TYPE(items[i]);
            any |= eligible[i] = type == tensor_type || type == parameter_type;
        }
        if (any && fast_grads(items, eligible, count, fast_found, counters, answered) < 0)
            goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        int fast = answered != NULL && answered[i];
        PyObject *grad = fast ? fast_found[i] : PyObject_GetAttr(items[i], name_grad);
        next = i + 1;
        if (grad == NULL)
            goto done;
        PyList_SET_ITEM(found, i, grad);
        PyObject *version;
        if (fast && (PyObject *)Py_TYPE(grad) == tensor_type) {
            version = PyLong_FromLongLong(counters[i]); /* (None is not a tensor: below) */
        } else if (grad == Py_None) {
            plain = 0;
            version = PyLong_FromLong(0);
        } else {
            if ((PyObject *)Py_TYPE(grad) != tensor_type)
                plain = 0;
            version = PyObject_GetAttr(grad, name_version);
        }
        if (version == NULL)
            goto done;
        PyList_SET_ITEM(versions, i, version);
    }
    result = Py_BuildValue("(NNO)", found, versions, plain ? Py_True : Py_False);
    found = versions = NULL; /* (the tuple's, or released with it) */
done:
    for (Py_ssize_t i = next; answered != NULL && i < count; i++)
        if (answered[i])
            Py_DECREF(fast_found[i]);
    PyMem_Free(fast_found);
    PyMem_Free(counters);
    PyMem_Free(eligible);
    PyMem_Free(answered);
    Py_XDECREF(found);
    Py_XDECREF(versions);
    Py_DECREF(seq);
    return result;
}

/* A tensor's version counter, into *out: 1, or -1 where torch raised. */
static int version_of(PyObject *t, long long *out) {
    if (fast_version != NULL && (PyObject *)Py_TYPE(t) == tensor_type && fast_version(t, out))
        return 1;
    PyObject *value = PyObject_GetAttr(t, name_version);
    if (value == NULL)
        return -1;
    *out = PyLong_AsLongLong(value);
    Py_DECREF(value);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 1;
}

/* What the weak reference `ref` refers to (a new reference; None where it is gone), or
 * NULL with an error set. */
static PyObject *referent(PyObject *ref) {
#if PY_VERSION_HEX >= 0x030D0000
    PyObject *object;
    int alive = PyWeakref_GetRef(ref, &object);
    if (alive < 0)
        return NULL;
    return alive ? object : Py_NewRef(Py_None);
#else
    PyObject *object = PyWeakref_GetObject(ref); /* (borrowed) */
    return object == NULL ? NULL : Py_NewRef(object);
#endif
}

/* intact(refs, versions, moved) -> list | None: what each weak reference (or None) refers to
 * now (None where it is gone); None instead where one of the `moved` indices has lost its
 * grad or gained one, or holds it at another version than `versions` says: the post-step
 * read's test (`norms.StepNorms.read_post`) of whether the grads are as `step()` left them. */
static PyObject *intact(PyObject *self, PyObject *args) {
    PyObject *refs_in, *versions_in, *moved_in;
    if (!PyArg_ParseTuple(args, "OOO", &refs_in, &versions_in, &moved_in))
        return NULL;
    PyObject *refs = PySequence_Fast(refs_in, "a sequence of weak references expected");
    if (refs == NULL)
        return NULL;
    PyObject *versions = NULL, *moved = NULL, *found = NULL, *result = NULL;
    versions = PySequence_Fast(versions_in, "a sequence of versions expected");
    moved = versions == NULL ? NULL : PySequence_Fast(moved_in, "a sequence of indices expected");
    if (moved == NULL)
        goto done;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(refs);
    PyObject **ref_items = PySequence_Fast_ITEMS(refs);
    found = PyList_New(count);
    if (found == NULL)
        goto done;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *now = Py_NewRef(Py_None);
        if (ref_items[i] != Py_None) {
            Py_DECREF(now);
            if (!PyWeakref_Check(ref_items[i])) {
                PyErr_SetString(PyExc_TypeError, "a weak reference or None expected");
                goto done;
            }
            now = referent(ref_items[i]);
            if (now == NULL)
                goto done;
        }
        PyList_SET_ITEM(found, i, now);
    }
    Py_ssize_t moves = PySequence_Fast_GET_SIZE(moved);
    PyObject **moved_items = PySequence_Fast_ITEMS(moved);
    for (Py_ssize_t k = 0; k < moves; k++) {
        Py_ssize_t i = PyLong_AsSsize_t(moved_items[k]);
        if (i == -1 && PyErr_Occurred())
            goto done;
        if (i < 0 || i >= count || i >= PySequence_Fast_GET_SIZE(versions)) {
            PyErr_SetString(PyExc_IndexError, "a moved index out of range");
            goto done;
        }
        PyObject *now = PyList_GET_ITEM(found, i);
        if ((now == Py_None) != (ref_items[i] == Py_None)) {
            result = Py_NewRef(Py_None);
            goto done;
        }
        if (now == Py_None)
            continue;
        long long version, expected = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(versions, i));
        if (expected == -1 && PyErr_Occurred())
            goto done;
        if (version_of(now, &version) < 0)
            goto done;
        if (version != expected) {
            result = Py_NewRef(Py_None);
            goto done;
        }
    }
    result = Py_NewRef(found);
done:
    Py_XDECREF(found);
    Py_XDECREF(moved);
    Py_XDECREF(versions);
    Py_DECREF(refs);
    return result;
}

/* use_fast(facts, grad, version, parameter_type): `tensor_facts.cpp`'s functions (their
 * addresses) and torch.nn.Parameter; use_fast(None, None, None, None): Python's attributes
 * for every tensor. */
static PyObject *use_fast(PyObject *self, PyObject *args) {
    PyObject *facts_address, *grad_address, *version_address, *param_type;
    if (!PyArg_ParseTuple(args, "OOOO", &facts_address, &grad_address, &version_address,
                          &param_type))
        return NULL;
    facts_fn facts = NULL;
    grads_fn grads_of = NULL;
    version_fn version = NULL;
    if (facts_address != Py_None && grad_address != Py_None && version_address != Py_None) {
        facts = (facts_fn)PyLong_AsVoidPtr(facts_address);
        grads_of = (grads_fn)PyLong_AsVoidPtr(grad_address);
        version = (version_fn)PyLong_AsVoidPtr(version_address);
        if (PyErr_Occurred())
            return NULL;
    }
    if (facts != NULL && tensor_type == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "configure() first");
        return NULL;
    }
    fast_facts = facts;
    fast_grads = grads_of;
    fast_version = version;
    Py_XSETREF(parameter_type, facts == NULL || param_type == Py_None ? NULL : Py_NewRef(param_type));
    Py_RETURN_NONE;
}

/* strided(tensors, contiguous) -> bool: whether every one is of type exactly torch.Tensor
 * and strided, and where `contiguous` is true contiguous too (`snapshot.take`'s test that a
 * model's grads are their own views, `fused.row_squares`' that a group's rows are them: a
 * thousand `layout` reads a snapshot, in one batch where `tensor_facts.cpp` was built). */
static PyObject *all_strided(PyObject *self, PyObject *args) {
    PyObject *tensors;
    int contiguous;
    if (!PyArg_ParseTuple(args, "Op", &tensors, &contiguous))
        return NULL;
    PyObject *seq = configured_sequence(tensors, "a sequence of tensors expected");
    if (seq == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    char eligible_here[ON_STACK], answered_here[ON_STACK];
    struct sfdiag_facts facts_here[ON_STACK];
    char *eligible = eligible_here, *answered = answered_here;
    struct sfdiag_facts *facts = facts_here;
    PyObject *result = NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        if ((PyObject *)Py_TYPE(items[i]) != tensor_type) {
            result = Py_NewRef(Py_False);
            goto done;
        }
    }
    int fast = fast_facts != NULL && count > 0;
    if (fast && count > ON_STACK) {
        eligible = PyMem_Malloc(count);
        answered = PyMem_Malloc(count);
        facts = PyMem_Malloc(count * sizeof(*facts));
        if (eligible == NULL || answered == NULL || facts == NULL) {
            PyErr_NoMemory();
            goto done;
        }
    }
    if (fast) {
        memset(eligible, 1, count);
        fast_facts(items, eligible, count, facts, answered);
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        int ok;
        if (fast && answered[i]) {
            ok = contiguous ? facts[i].contiguous : facts[i].strided;
        } else {
            ok = attribute_is(items[i], name_layout, strided);
            if (ok == 1 && contiguous) {
                PyObject *answer = PyObject_CallMethodNoArgs(items[i], name_is_contiguous);
                if (answer == NULL)
                    goto done;
                Py_DECREF(answer);
                ok = answer == Py_True;
            }
        }
        if (ok < 0)
            goto done;
        if (ok == 0) {
            result = Py_NewRef(Py_False);
            goto done;
        }
    }
    result = Py_NewRef(Py_True);
done:
    release(eligible, eligible_here);
    release(answered, answered_here);
    release(facts, facts_here);
    Py_DECREF(seq);
    return result;
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
    {"strided", all_strided, METH_VARARGS, "strided(tensors, contiguous) -> bool"},
    {"use_fast", use_fast, METH_VARARGS, "use_fast(facts, grad, version, parameter_type)"},
    {"intact", intact, METH_VARARGS, "intact(refs, versions, moved) -> list | None"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_sfdiag_plain_squares", NULL, -1,
                                    methods};

PyMODINIT_FUNC PyInit__sfdiag_plain_squares(void) { return PyModule_Create(&module); }
