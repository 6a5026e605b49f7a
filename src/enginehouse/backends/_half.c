/* FP32 to FP16 conversion of host arrays, for staging the inputs of fp16 GPU engines.
 *
 * An fp16 engine built from an fp32 program casts each floating input to fp16 as its first
 * step (builder/torch_builder.py), so an FP32 input can be staged in page-locked memory as
 * FP16 already: half the bytes written on the host and half copied to the device, with the
 * same values, since the device's cast and this one both round to nearest even. NumPy's
 * float16 cast runs at about 1.5 GB/s on one core; the F16C instructions convert eight
 * floats per instruction and leave the copy bound by memory. The conversion runs without the
 * GIL, so the host-copy threads convert a batch's rows side by side.
 *
 * available() says whether this CPU has F16C (x86-64 since 2012); to_half(destination,
 * source) converts the float32 buffer source into the float16 buffer destination.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_F16C_BUILD 1

__attribute__((target("avx,f16c"))) static void convert(const float *source, uint16_t *target,
                                                        Py_ssize_t count) {
    Py_ssize_t i = 0;
    for (; i + 8 <= count; i += 8) {
        __m256 floats = _mm256_loadu_ps(source + i);
        _mm_storeu_si128((__m128i *)(target + i),
                         _mm256_cvtps_ph(floats, _MM_FROUND_TO_NEAREST_INT));
    }
    if (i < count) {
        float rest[8] = {0};
        uint16_t out[8];
        memcpy(rest, source + i, (size_t)(count - i) * sizeof(float));
        _mm_storeu_si128((__m128i *)out,
                         _mm256_cvtps_ph(_mm256_loadu_ps(rest), _MM_FROUND_TO_NEAREST_INT));
        memcpy(target + i, out, (size_t)(count - i) * sizeof(uint16_t));
    }
}

static int cpu_has_f16c(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
}
#else
#define HAVE_F16C_BUILD 0
static int cpu_has_f16c(void) { return 0; }
#endif

static PyObject *available(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyBool_FromLong(cpu_has_f16c());
}

static PyObject *to_half(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer target, source;
    if (!PyArg_ParseTuple(args, "w*y*", &target, &source)) {
        return NULL;
    }
    PyObject *result = NULL;
    if (!cpu_has_f16c()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU has no F16C instructions");
    } else if (source.len % (Py_ssize_t)sizeof(float) != 0 || target.len * 2 != source.len) {
        PyErr_Format(PyExc_ValueError,
                     "a float32 source of %zd bytes does not fill a float16 target of %zd bytes",
                     source.len, target.len);
    } else {
#if HAVE_F16C_BUILD
        Py_BEGIN_ALLOW_THREADS convert((const float *)source.buf, (uint16_t *)target.buf,
                                       source.len / (Py_ssize_t)sizeof(float));
        Py_END_ALLOW_THREADS
#endif
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&target);
    PyBuffer_Release(&source);
    return result;
}

static PyMethodDef methods[] = {
    {"available", available, METH_NOARGS, "Whether this CPU converts with F16C."},
    {"to_half", to_half, METH_VARARGS,
     "to_half(destination, source): the float32 buffer source into the float16 buffer "
     "destination (C-contiguous both), rounding to nearest even."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_half", "FP32 to FP16 conversion with F16C.", -1, methods,
};

PyMODINIT_FUNC PyInit__half(void) { return PyModule_Create(&module); }
