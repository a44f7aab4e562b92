/* The sound card's stream callback, in C.
 *
 * PortAudio calls it on the audio server's realtime thread once a period (5.3 ms at
 * 256 frames, 48 kHz). The first callback was Python, in a process of its own with
 * the GC off and memory locked, and it still missed its deadline about once in three
 * minutes: it needs the GIL, allocates, and runs the interpreter. This one only
 * copies samples between the stream's interleaved buffers and the shared rings, and
 * keeps the counts the gateway's tick reads. It takes no lock, allocates nothing and
 * touches no Python object, so it runs with the GIL held by anyone.
 *
 * Layouts are the Python side's: a ring is ring.py's SharedRing (four int64
 * counters, then float32 samples), the counters are card_main.py's. The structs
 * below are built by card_main.py (ctypes) and passed as PortAudio's userData.
 *
 * The rings are shared between processes and CPUs, so every counter another side
 * reads is a C11 atomic: a writer stores its samples, then the counter with release
 * order; a reader loads the counter with acquire order, then the samples. x86-64
 * would keep that order anyway; arm64 (a Raspberry Pi-class site box) does not, and
 * a reader could see the counter before the samples. The gateway's side of the rings
 * goes through the same functions (shared.h: ring_push / ring_pop, from ring.py and
 * _elastic.c), so both ends keep the order on every CPU.
 *
 * A stream carries one or more lanes: a lane takes one input channel into its
 * capture ring and plays its playback ring into one output channel. A radio's card
 * has one lane; the test suite's radio simulator has one per radio.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "shared.h"

typedef struct {
    ring_t rx, tx;
    int64_t *status;          /* this lane's counts: TX_UNDERRUNS, RX_DROPPED */
    int32_t input_channel, output_channel;
    int32_t serving;          /* played a whole period since it last ran dry */
    int32_t unused;
} lane_t;

typedef struct {
    int64_t *status;          /* the stream's counts: XRUNS, FRAMES, TOTAL */
    double *clock;            /* CLOCK_MONOTONIC (Python's time.monotonic) of the last call,
                                 when frame STAMP_FRAME was the next to play and record */
    int32_t input_channels, output_channels;
    int32_t lanes, unused;
    lane_t *lane;
} stream_t;

/* Where the callback's stack is (the address of one of its locals, from its last call):
 * the card's process locks those pages in memory (card_main.py). */
static void *callback_stack;

static void serve_lane(lane_t *lane, const float *in, int in_channels, float *out,
                       int out_channels, int64_t frames)
{
    int64_t *s = lane->status;
    if (in != NULL)
        s[RX_DROPPED] += ring_push(&lane->rx, in + lane->input_channel, in_channels, frames);
    if (out == NULL)
        return;
    int64_t got = ring_pop(&lane->tx, out + lane->output_channel, out_channels, frames);
    /* an underrun is counted once per run dry, not again until a whole period played */
    if (got < frames && lane->serving)
        s[TX_UNDERRUNS] += 1;
    lane->serving = got == frames;
}

/* PortAudio's PaStreamCallback, for interleaved float32 buffers. */
static int stream_callback(const void *input, void *output, unsigned long frames,
                           const void *time_info, unsigned long status_flags, void *user_data)
{
    (void)time_info;
    stream_t *st = user_data;
    callback_stack = &st;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    /* The time and the frame it belongs to change together: STAMP is odd while they are
     * written, so a reader that saw it even and unchanged around its reads has a pair. */
    int64_t *s = st->status;
    double when = (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
    int64_t seq = own(&s[STAMP]);
    __atomic_store_n(&s[STAMP], seq + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    __atomic_store(&st->clock[0], &when, __ATOMIC_RELAXED);
    __atomic_store_n(&s[STAMP_FRAME], own(&s[TOTAL]), __ATOMIC_RELAXED);
    store(&s[STAMP], seq + 2);
    st->status[FRAMES] = (int64_t)frames;
    if (status_flags)
        st->status[XRUNS] += 1;
    if (output != NULL)
        memset(output, 0, frames * (size_t)st->output_channels * sizeof(float));
    for (int i = 0; i < st->lanes; i++)
        serve_lane(&st->lane[i], input, st->input_channels, output, st->output_channels,
                   (int64_t)frames);
    store(&st->status[TOTAL], own(&st->status[TOTAL]) + (int64_t)frames);
    return 0; /* paContinue */
}

/* --- the gateway's side of the rings (ring.py) ---------------------------------
 *
 * Called from Python with a ring's counters (four int64) and its samples (float32) as
 * two writable buffers, and the caller's samples as a float32 buffer. */

static PyObject *py_ring_push(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer counters, samples, src;
    if (!PyArg_ParseTuple(args, "w*w*y*:ring_push", &counters, &samples, &src))
        return NULL;
    ring_t r;
    int64_t left = -1;
    if (ring_of(&counters, &samples, &r) == 0)
        left = ring_push(&r, src.buf, 1, src.len / (Py_ssize_t)sizeof(float));
    PyBuffer_Release(&counters);
    PyBuffer_Release(&samples);
    PyBuffer_Release(&src);
    return left < 0 ? NULL : PyLong_FromLongLong(left);
}

static PyObject *py_ring_pop(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer counters, samples, out;
    if (!PyArg_ParseTuple(args, "w*w*w*:ring_pop", &counters, &samples, &out))
        return NULL;
    ring_t r;
    int64_t got = -1;
    if (ring_of(&counters, &samples, &r) == 0)
        got = ring_pop(&r, out.buf, 1, out.len / (Py_ssize_t)sizeof(float));
    PyBuffer_Release(&counters);
    PyBuffer_Release(&samples);
    PyBuffer_Release(&out);
    return got < 0 ? NULL : PyLong_FromLongLong(got);
}

static PyObject *py_ring_ask_skip(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer counters;
    long long n;
    if (!PyArg_ParseTuple(args, "w*L:ring_ask_skip", &counters, &n))
        return NULL;
    int ok = counters.len >= (Py_ssize_t)(4 * sizeof(int64_t))
             && (uintptr_t)counters.buf % sizeof(int64_t) == 0;
    if (ok) { /* only the writer moves it: a plain add, published with release order */
        int64_t *c = counters.buf;
        store(&c[SKIP_ASKED], own(&c[SKIP_ASKED]) + n);
    }
    PyBuffer_Release(&counters);
    if (!ok) {
        PyErr_SetString(PyExc_ValueError, "not a ring's counters: 4 aligned int64");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* The last callback's (first frame, time) as one pair (see shared.h). */
static PyObject *py_stamp(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer status, clock;
    if (!PyArg_ParseTuple(args, "w*w*:stamp", &status, &clock))
        return NULL;
    if (status.len < (Py_ssize_t)(COUNTERS * sizeof(int64_t))
        || clock.len < (Py_ssize_t)sizeof(double)) {
        PyBuffer_Release(&status);
        PyBuffer_Release(&clock);
        PyErr_SetString(PyExc_ValueError, "stamp: status or clock too short");
        return NULL;
    }
    int64_t frame;
    double when;
    read_stamp(status.buf, clock.buf, &frame, &when);
    PyBuffer_Release(&status);
    PyBuffer_Release(&clock);
    return Py_BuildValue("Ld", (long long)frame, when);
}

static PyObject *py_callback_stack(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyLong_FromVoidPtr(__atomic_load_n(&callback_stack, __ATOMIC_RELAXED));
}

static PyMethodDef methods[] = {
    {"ring_push", py_ring_push, METH_VARARGS,
     "ring_push(counters, samples, x) -> how many of x did not fit (the writer's side)"},
    {"ring_pop", py_ring_pop, METH_VARARGS,
     "ring_pop(counters, samples, out) -> how many it got, after any skip (the reader's)"},
    {"ring_ask_skip", py_ring_ask_skip, METH_VARARGS,
     "ring_ask_skip(counters, n): ask the reader to drop the n oldest (the writer's)"},
    {"stamp", py_stamp, METH_VARARGS, "stamp(status, clock) -> (first frame, monotonic time)"},
    {"callback_stack", py_callback_stack, METH_NOARGS,
     "an address on the callback's stack at its last call (0: not called yet)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_callback",
    .m_doc = "The sound card's stream callback in C (CALLBACK is its address), and the "
             "rings' operations with the memory order both sides need.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__callback(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    /* the sizes let the Python side check its ctypes mirror of the structs */
    PyObject *address = PyLong_FromVoidPtr((void *)stream_callback);
    int failed = address == NULL || PyModule_AddObjectRef(m, "CALLBACK", address) < 0;
    Py_XDECREF(address);
    if (failed || PyModule_AddIntConstant(m, "STREAM_SIZE", sizeof(stream_t)) < 0
        || PyModule_AddIntConstant(m, "LANE_SIZE", sizeof(lane_t)) < 0
        || PyModule_AddIntConstant(m, "RING_HEADER_BYTES", 4 * sizeof(int64_t)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
