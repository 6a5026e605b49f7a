/* Host copies into page-locked staging buffers, the CPU's half of a GPU engine's input copy.
 *
 * What a staging buffer holds is read next by the GPU's copy engine, never by this CPU, so
 * both copies here write with non-temporal (streaming) stores: a plain store first reads
 * each destination line into the cache and later writes it back, a third more memory
 * traffic than the copy needs where memory bounds a batch's copy (588 KB images, 154 MB a
 * batch of 256). bench/staging_copies.py measured such a batch 1.29-1.38x faster than
 * memcpy on a 2-core machine, and as fast (0.97-1.02x; 1.02-1.11x converting to FP16) on the
 * 16 cores of the H200 host, whose copies scale with threads instead.
 *
 * - copy(destination, source): the bytes of source into destination (C-contiguous both,
 *   the same size).
 * - to_half(destination, source): the float32 buffer source into the float16 buffer
 *   destination, rounding to nearest even. An fp16 engine built from an fp32 program casts
 *   each floating input to fp16 as its first step (builder/torch_builder.py), so an FP32
 *   input can be staged as FP16 already: half the bytes written on the host and half
 *   copied to the device, with the same values, since the device's cast and this one both
 *   round to nearest even. NumPy's float16 cast runs at about 1.5 GB/s on one core; the
 *   F16C instructions convert eight floats per instruction and leave it bound by memory.
 * - half_available(): whether this CPU has F16C (x86-64 since 2012), which to_half needs.
 *
 * Both release the GIL, so the host-copy threads copy a batch's rows side by side. Both take
 * a third argument, streaming (default true): false stores through the cache, as memcpy does,
 * for a destination this CPU reads next (and for bench/staging_copies.py's comparison).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define HAVE_X86_BUILD 1

/* Bytes until p is 16-byte aligned, at most limit. */
static size_t head_bytes(const void *p, size_t limit) {
    size_t misaligned = (size_t)((uintptr_t)p & 15u);
    size_t head = misaligned ? 16u - misaligned : 0u;
    return head < limit ? head : limit;
}

static void stream_copy(char *target, const char *source, size_t size, int streaming) {
    if (!streaming) {
        memcpy(target, source, size);
        return;
    }
    size_t head = head_bytes(target, size);
    memcpy(target, source, head);
    size_t i = head;
    for (; i + 64 <= size; i += 64) {
        __m128i a = _mm_loadu_si128((const __m128i *)(source + i));
        __m128i b = _mm_loadu_si128((const __m128i *)(source + i + 16));
        __m128i c = _mm_loadu_si128((const __m128i *)(source + i + 32));
        __m128i d = _mm_loadu_si128((const __m128i *)(source + i + 48));
        _mm_stream_si128((__m128i *)(target + i), a);
        _mm_stream_si128((__m128i *)(target + i + 16), b);
        _mm_stream_si128((__m128i *)(target + i + 32), c);
        _mm_stream_si128((__m128i *)(target + i + 48), d);
    }
    _mm_sfence();
    memcpy(target + i, source + i, size - i);
}

/* count floats (fewer than eight) converted through a zero-padded vector. */
__attribute__((target("avx,f16c"))) static void convert_few(const float *source,
                                                            uint16_t *target, size_t count) {
    float rest[8] = {0};
    uint16_t out[8];
    memcpy(rest, source, count * sizeof(float));
    _mm_storeu_si128((__m128i *)out,
                     _mm256_cvtps_ph(_mm256_loadu_ps(rest), _MM_FROUND_TO_NEAREST_INT));
    memcpy(target, out, count * sizeof(uint16_t));
}

__attribute__((target("avx,f16c"))) static void convert(const float *source, uint16_t *target,
                                                        size_t count, int streaming) {
    size_t i = 0;
    if (streaming && ((uintptr_t)target & 1u) == 0) {
        /* Up to the first 16-byte boundary of the target, then streaming stores. */
        size_t head = head_bytes(target, count * sizeof(uint16_t)) / sizeof(uint16_t);
        if (head) {
            convert_few(source, target, head);
        }
        for (i = head; i + 8 <= count; i += 8) {
            __m256 floats = _mm256_loadu_ps(source + i);
            _mm_stream_si128((__m128i *)(target + i),
                             _mm256_cvtps_ph(floats, _MM_FROUND_TO_NEAREST_INT));
        }
        _mm_sfence();
    } else {
        for (; i + 8 <= count; i += 8) {
            __m256 floats = _mm256_loadu_ps(source + i);
            _mm_storeu_si128((__m128i *)(target + i),
                             _mm256_cvtps_ph(floats, _MM_FROUND_TO_NEAREST_INT));
        }
    }
    if (i < count) {
        convert_few(source + i, target + i, count - i);
    }
}

static int cpu_has_f16c(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx") && __builtin_cpu_supports("f16c");
}
#else
#define HAVE_X86_BUILD 0
static void stream_copy(char *target, const char *source, size_t size, int streaming) {
    (void)streaming;
    memcpy(target, source, size);
}
static int cpu_has_f16c(void) { return 0; }
#endif

static PyObject *half_available(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyBool_FromLong(cpu_has_f16c());
}

/* copy() and to_half(): parses (writable destination, readable source[, streaming]), both
 * C-contiguous, checks that they fit each other, and copies (half: converting to FP16)
 * without the GIL. */
static PyObject *staged_copy(PyObject *args, int half) {
    Py_buffer target, source;
    int streaming = 1;
    if (!PyArg_ParseTuple(args, "w*y*|p", &target, &source, &streaming)) {
        return NULL;
    }
    PyObject *result = NULL;
    if (half && !cpu_has_f16c()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU has no F16C instructions");
    } else if (half &&
               (source.len % (Py_ssize_t)sizeof(float) != 0 || target.len * 2 != source.len)) {
        PyErr_Format(PyExc_ValueError,
                     "a float32 source of %zd bytes does not fill a float16 target of %zd bytes",
                     source.len, target.len);
    } else if (!half && target.len != source.len) {
        PyErr_Format(PyExc_ValueError, "a source of %zd bytes does not fill a target of %zd bytes",
                     source.len, target.len);
    } else {
        Py_BEGIN_ALLOW_THREADS
        if (half) {
#if HAVE_X86_BUILD
            convert((const float *)source.buf, (uint16_t *)target.buf,
                    (size_t)source.len / sizeof(float), streaming);
#endif
        } else {
            stream_copy((char *)target.buf, (const char *)source.buf, (size_t)source.len,
                        streaming);
        }
        Py_END_ALLOW_THREADS
        result = Py_None;
        Py_INCREF(result);
    }
    PyBuffer_Release(&target);
    PyBuffer_Release(&source);
    return result;
}

static PyObject *copy(PyObject *self, PyObject *args) {
    (void)self;
    return staged_copy(args, 0);
}

static PyObject *to_half(PyObject *self, PyObject *args) {
    (void)self;
    return staged_copy(args, 1);
}

static PyMethodDef methods[] = {
    {"half_available", half_available, METH_NOARGS, "Whether this CPU converts with F16C."},
    {"copy", copy, METH_VARARGS,
     "copy(destination, source, streaming=True): the bytes of source into destination "
     "(C-contiguous both, the same size), with streaming stores unless told otherwise."},
    {"to_half", to_half, METH_VARARGS,
     "to_half(destination, source, streaming=True): the float32 buffer source into the float16 "
     "buffer destination (C-contiguous both), rounding to nearest even, with streaming stores "
     "unless told otherwise."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_staging",
    "Host copies into page-locked staging buffers, with streaming stores.", -1, methods,
};

PyMODINIT_FUNC PyInit__staging(void) { return PyModule_Create(&module); }
