/* Survive a client truncating a shared-memory object that this process has mapped.
 *
 * Reading or writing a page of a shared mapping past its file's end raises SIGBUS, whose
 * default action ends the process. A client that truncates a region it registered while a
 * request reads it in place would kill the server. This module installs a SIGBUS handler
 * that, for an address inside a guarded range, maps anonymous zero pages over the rest of
 * that range (so the faulting access, repeated on return, succeeds) and counts the fault;
 * the server then fails the request that used the range and refuses the range from then on.
 * Any other SIGBUS goes to the handler that was installed before (Python's faulthandler,
 * or the default action).
 *
 * The handler only reads the range table (plain loads of aligned words) and calls mmap,
 * which on Linux is a system call with no user-space state. The table is written under the
 * GIL by add and remove; a range is removed only once nothing uses it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define MAX_RANGES 4096

typedef struct {
    _Atomic uintptr_t start; /* 0: the slot is free */
    _Atomic uintptr_t end;
    _Atomic unsigned long faults;
} guarded_range;

static guarded_range ranges[MAX_RANGES];
static struct sigaction previous;
static int installed;
static uintptr_t page_size;

static void pass_on(int sig, siginfo_t *info, void *context) {
    if (previous.sa_flags & SA_SIGINFO) {
        if (previous.sa_sigaction != NULL) {
            previous.sa_sigaction(sig, info, context);
            return;
        }
    } else if (previous.sa_handler != SIG_DFL && previous.sa_handler != SIG_IGN) {
        previous.sa_handler(sig);
        return;
    }
    /* The default action: restore it; the access faults again on return and ends the
     * process as it would have without this module. */
    signal(sig, SIG_DFL);
}

static void on_bus_error(int sig, siginfo_t *info, void *context) {
    uintptr_t address = (uintptr_t)info->si_addr;
    for (int i = 0; i < MAX_RANGES; i++) {
        uintptr_t start = atomic_load_explicit(&ranges[i].start, memory_order_acquire);
        if (start == 0 || address < start) {
            continue;
        }
        uintptr_t end = atomic_load_explicit(&ranges[i].end, memory_order_relaxed);
        if (address >= end) {
            continue;
        }
        uintptr_t first = address & ~(page_size - 1);
        uintptr_t last = (end + page_size - 1) & ~(page_size - 1);
        void *placed = mmap((void *)first, last - first, PROT_READ | PROT_WRITE,
                            MAP_FIXED | MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (placed == MAP_FAILED) {
            break;
        }
        atomic_fetch_add_explicit(&ranges[i].faults, 1, memory_order_release);
        return;
    }
    pass_on(sig, info, context);
}

static int install(void) {
    if (installed) {
        return 0;
    }
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = on_bus_error;
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    if (sigaction(SIGBUS, &action, &previous) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    installed = 1;
    return 0;
}

static PyObject *guard_add(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "add(address, length)");
        return NULL;
    }
    uintptr_t start = (uintptr_t)PyLong_AsUnsignedLongLong(args[0]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    uintptr_t length = (uintptr_t)PyLong_AsUnsignedLongLong(args[1]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    if (start == 0 || length == 0 || start + length < start) {
        PyErr_SetString(PyExc_ValueError, "an empty or wrapping range");
        return NULL;
    }
    if (install() != 0) {
        return NULL;
    }
    for (int i = 0; i < MAX_RANGES; i++) {
        if (atomic_load_explicit(&ranges[i].start, memory_order_relaxed) == 0) {
            atomic_store_explicit(&ranges[i].faults, 0, memory_order_relaxed);
            atomic_store_explicit(&ranges[i].end, start + length, memory_order_relaxed);
            atomic_store_explicit(&ranges[i].start, start, memory_order_release);
            return PyLong_FromLong(i);
        }
    }
    PyErr_SetString(PyExc_RuntimeError, "every guarded range is in use");
    return NULL;
}

static int slot_of(PyObject *arg) {
    long slot = PyLong_AsLong(arg);
    if (slot == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (slot < 0 || slot >= MAX_RANGES) {
        PyErr_SetString(PyExc_ValueError, "no such guarded range");
        return -1;
    }
    return (int)slot;
}

static PyObject *guard_remove(PyObject *module, PyObject *arg) {
    (void)module;
    int slot = slot_of(arg);
    if (slot < 0) {
        return NULL;
    }
    atomic_store_explicit(&ranges[slot].start, 0, memory_order_release);
    Py_RETURN_NONE;
}

static PyObject *guard_faults(PyObject *module, PyObject *arg) {
    (void)module;
    int slot = slot_of(arg);
    if (slot < 0) {
        return NULL;
    }
    return PyLong_FromUnsignedLong(
        atomic_load_explicit(&ranges[slot].faults, memory_order_acquire));
}

static PyMethodDef methods[] = {
    {"add", (PyCFunction)(void (*)(void))guard_add, METH_FASTCALL,
     "add(address, length) -> slot: guard a mapped range against SIGBUS"},
    {"remove", guard_remove, METH_O, "remove(slot): stop guarding a range"},
    {"faults", guard_faults, METH_O, "faults(slot) -> how many faults the range has taken"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "_mapping_guard",
    "SIGBUS on a truncated shared mapping, turned into a count (see the source).", -1, methods,
};

PyMODINIT_FUNC PyInit__mapping_guard(void) {
    page_size = (uintptr_t)sysconf(_SC_PAGESIZE);
    return PyModule_Create(&module_def);
}
