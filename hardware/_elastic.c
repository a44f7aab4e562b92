/* An elastic FIFO's audio path in C (see elastic.py): the variable-ratio resampler, its
 * carried input, and the moves between it, a card's ring and the tick.
 *
 * Each radio moves audio three times a tick (the capture ring into the receive FIFO, a
 * frame out of it, a frame into the playback ring), each through the resampler. In
 * Python and NumPy that was some thirty calls of 1-3 us per radio and tick (ring reads,
 * concatenations, slices, the resampler's bookkeeping), and on a machine that sleeps
 * between ticks every one of them runs from cold caches: about 150 us a radio. Here each
 * move is one call. The control (levels, the PI loop, trim and pad decisions) stays in
 * Python, once a tick.
 *
 * The resampler: output k is at input position pos + k * step (index into the carried
 * input, fractional); its kernel row is the table's row at the position's fraction
 * (PHASES rows per sample), blended linearly with the next one (slope = next row - this
 * row). The table is codecs/interp.py's kaiser_sinc. An output is made once the input
 * covers its whole kernel; the input still needed by later outputs is carried to the
 * next call, so the stream has no seams and a fixed latency of half the kernel.
 *
 * The resampled audio waits in the resampler's store: the receive FIFO's audio until the
 * tick takes it (Resampler.take, which first pulls all the capture ring holds; at the end
 * of the tick Resampler.capture pulls up to the card's last callback, with its stamp),
 * the transmit FIFO's only until it is pushed into the playback ring in the same call
 * (Resampler.push).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "shared.h"

#define CHUNK 4096          /* input resampled per pass (a 20 ms frame at 192 kHz fits) */
#define STORE (1 << 16)     /* output waiting: 4 s at 16 kHz, beyond any trim's threshold */
#define TRIES 100           /* a callback takes microseconds: a consistent read needs one or two */

typedef struct {
    PyObject_HEAD
    float *table, *slope;   /* phases x taps */
    int phases, taps;
    double pos;             /* the next output's position in `carried` */
    float *carried;         /* input: what the next outputs' kernels still need, then new */
    Py_ssize_t carried_len, carried_cap;
    float *store;           /* output waiting */
    Py_ssize_t stored;
    long long overflowed;   /* outputs the store lost to a stall's backlog */
} Resampler;

/* Four floats in one vector register (SSE on x86-64, NEON on arm64; GCC and clang).
 * Spelled out because the auto-vectoriser gives up on the plain loop under Python's own
 * -fwrapv, which extensions are built with: 2.4 times slower (measured). */
typedef float f4 __attribute__((vector_size(16)));

static inline f4 f4_at(const float *p)
{
    f4 v;
    memcpy(&v, p, sizeof v); /* (unaligned load) */
    return v;
}

/* Output k = the windowed sinc of x at pos + k * step. The caller makes sure every
 * kernel lies inside x (see resample). */
static void interpolate(const Resampler *r, const float *x, double pos, double step, float *y,
                        Py_ssize_t n)
{
    int taps = r->taps, phases = r->phases, half = taps / 2;
    for (Py_ssize_t k = 0; k < n; k++) {
        double p = pos + (double)k * step;
        Py_ssize_t base = (Py_ssize_t)p; /* p >= half - 1 > 0: truncation is floor */
        double phase = (p - (double)base) * phases;
        int row = (int)phase;
        if (row > phases - 1)
            row = phases - 1;
        float alpha = (float)(phase - row);
        const float *w = r->table + (Py_ssize_t)row * taps, *dw = r->slope + (Py_ssize_t)row * taps;
        const float *in = x + base - (half - 1);
        f4 sum = {0.0f, 0.0f, 0.0f, 0.0f};
        int j = 0;
        for (; j + 4 <= taps; j += 4)
            sum += f4_at(in + j) * (f4_at(w + j) + alpha * f4_at(dw + j));
        float tail = 0.0f;
        for (; j < taps; j++)
            tail += in[j] * (w[j] + alpha * dw[j]);
        y[k] = (sum[0] + sum[1]) + (sum[2] + sum[3]) + tail;
    }
}

/* Is all of x silence? Then so is every output made from it, without the kernel. */
static int silent(const float *x, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (x[i] != 0.0f)
            return 0;
    return 1;
}

/* Every output whose kernel the carried input now covers, into the store (as far as it
 * has room); then drop the input no later output needs. */
static void resample(Resampler *r, double step)
{
    int half = r->taps / 2;
    double limit = (double)(r->carried_len - half); /* positions below have their lookahead */
    Py_ssize_t n = 0;
    if (limit > r->pos) {
        n = (Py_ssize_t)ceil((limit - r->pos) / step);
        if (n && r->pos + (double)(n - 1) * step >= limit)
            n -= 1; /* ceil() may overshoot by one in floating point */
    }
    if (n > STORE - r->stored)
        n = STORE - r->stored;
    if (silent(r->carried, r->carried_len)) /* (an idle radio transmits silence every tick) */
        memset(r->store + r->stored, 0, (size_t)n * sizeof(float));
    else
        interpolate(r, r->carried, r->pos, step, r->store + r->stored, n);
    r->stored += n;
    double next = r->pos + (double)n * step;
    Py_ssize_t keep_from = (Py_ssize_t)floor(next) - (half - 1);
    memmove(r->carried, r->carried + keep_from,
            (size_t)(r->carried_len - keep_from) * sizeof(float));
    r->carried_len -= keep_from;
    r->pos = next - (double)keep_from;
}

/* How much input fits in one pass: the carried buffer's room, and no more than the
 * store's room can take once resampled. */
static Py_ssize_t room(const Resampler *r, double step)
{
    Py_ssize_t in = r->carried_cap - r->carried_len;
    Py_ssize_t out = (Py_ssize_t)((double)(STORE - r->stored - 2) * step);
    return in < out ? in : out;
}

static int check_step(double step)
{
    if (!(step > 1.0 / 64 && step < 64.0)) {
        PyErr_SetString(PyExc_ValueError, "step: input samples per output, 1/64 to 64");
        return -1;
    }
    return 0;
}

/* --- the type ------------------------------------------------------------------------ */

/* Does the table make a kernel: phases rows of taps (even) float32, a slope as large? */
static int kernel_shape(const Py_buffer *table, const Py_buffer *slope, int taps)
{
    Py_ssize_t row = (Py_ssize_t)taps * (Py_ssize_t)sizeof(float);
    if (taps < 2 || taps % 2 != 0 || table->len != slope->len)
        return 0;
    return table->len > 0 && table->len % row == 0;
}

/* The kernel copied in, the carried input (silence before the first) and an empty store. */
static int setup(Resampler *self, const Py_buffer *table, const Py_buffer *slope, int taps)
{
    PyMem_Free(self->table);
    PyMem_Free(self->carried);
    PyMem_Free(self->store);
    self->phases = (int)(table->len / ((Py_ssize_t)taps * (Py_ssize_t)sizeof(float)));
    self->taps = taps;
    self->carried_cap = taps + CHUNK;
    self->table = PyMem_Malloc((size_t)(2 * table->len));
    self->carried = PyMem_Calloc((size_t)self->carried_cap, sizeof(float));
    self->store = PyMem_Malloc(STORE * sizeof(float));
    if (!self->table || !self->carried || !self->store) {
        PyErr_NoMemory();
        return -1;
    }
    self->slope = self->table + table->len / (Py_ssize_t)sizeof(float);
    memcpy(self->table, table->buf, (size_t)table->len);
    memcpy(self->slope, slope->buf, (size_t)slope->len);
    self->carried_len = taps - 1;
    self->pos = taps / 2 - 1;
    self->stored = 0;
    self->overflowed = 0;
    return 0;
}

static int Resampler_init(Resampler *self, PyObject *args, PyObject *kwds)
{
    (void)kwds;
    Py_buffer table, slope;
    int taps, done = -1;
    if (!PyArg_ParseTuple(args, "y*y*i:Resampler", &table, &slope, &taps))
        return -1;
    if (!kernel_shape(&table, &slope, taps))
        PyErr_SetString(PyExc_ValueError, "Resampler: table and slope need phases x taps float32");
    else
        done = setup(self, &table, &slope, taps);
    PyBuffer_Release(&table);
    PyBuffer_Release(&slope);
    return done;
}

static void Resampler_dealloc(Resampler *self)
{
    PyMem_Free(self->table);
    PyMem_Free(self->carried);
    PyMem_Free(self->store);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* All the ring holds, resampled into the store; returns how many samples that was. A
 * store that fills (the tick stalled for seconds) loses its older half, counted: the
 * trim would cut it at the end of the tick anyway, and the ring is always emptied, so
 * what was pulled is all the card captured (capture's stamp depends on it). */
static int64_t pull_all(Resampler *self, ring_t *ring, double step)
{
    int64_t got = 0;
    for (;;) {
        Py_ssize_t fit = room(self, step);
        if (fit < 1 && self->stored > 0) {
            Py_ssize_t old = self->stored - self->stored / 2;
            self->stored -= old;
            memmove(self->store, self->store + old, (size_t)self->stored * sizeof(float));
            self->overflowed += old;
            continue;
        }
        int64_t n = fit > 0 ? ring_pop(ring, self->carried + self->carried_len, 1, fit) : 0;
        if (n == 0)
            return got;
        self->carried_len += n;
        got += n;
        resample(self, step);
    }
}

/* The last finished callback's stamp, with all the audio up to it pulled in (see
 * capture). After TRIES the last stamp read stands: a callback pre-empted half-way
 * (stamped, its audio not yet in the ring) leaves the level a period short for this
 * tick, which the PI loop's smoothing rides. */
static void pull_to_stamp(Resampler *self, ring_t *ring, double step, int64_t *status,
                          double *clock, int64_t *frame, double *when)
{
    pull_all(self, ring, step);
    for (int i = 0; i < TRIES; i++) {
        read_stamp(status, clock, frame, when);
        /* the callback has finished (its audio is in the ring) */
        int done = load(&status[TOTAL])
                   == *frame + __atomic_load_n(&status[FRAMES], __ATOMIC_RELAXED);
        if (pull_all(self, ring, step) != 0 || !done)
            continue;
        int64_t again;
        double then;
        read_stamp(status, clock, &again, &then);
        if (again == *frame && then == *when)
            return;
    }
}

/* capture(counters, samples, step, status, clock) -> (frame, when): the card's last
 * finished callback's stamp (shared.h), and all the audio captured up to it (and no
 * further) pulled into the store, read as one consistent set: a callback that ran
 * between the reads is waited out, so the audio and the stamp belong together. */
static PyObject *Resampler_capture(Resampler *self, PyObject *args)
{
    Py_buffer counters, samples, status, clock;
    double step, when = 0.0;
    int64_t frame = 0;
    if (!PyArg_ParseTuple(args, "w*w*dw*w*:capture", &counters, &samples, &step, &status, &clock))
        return NULL;
    ring_t ring;
    int ok = check_step(step) == 0 && ring_of(&counters, &samples, &ring) == 0;
    int sized = status.len >= (Py_ssize_t)(COUNTERS * sizeof(int64_t))
                && clock.len >= (Py_ssize_t)sizeof(double);
    if (ok && !sized)
        PyErr_SetString(PyExc_ValueError, "capture: status or clock too short");
    if (ok && sized)
        pull_to_stamp(self, &ring, step, status.buf, clock.buf, &frame, &when);
    PyBuffer_Release(&counters);
    PyBuffer_Release(&samples);
    PyBuffer_Release(&status);
    PyBuffer_Release(&clock);
    return ok && sized ? Py_BuildValue("Ld", (long long)frame, when) : NULL;
}

/* push(x, counters, samples, step) -> how many resampled samples did not fit the ring. */
static PyObject *Resampler_push(Resampler *self, PyObject *args)
{
    Py_buffer x, counters, samples;
    double step;
    if (!PyArg_ParseTuple(args, "y*w*w*d:push", &x, &counters, &samples, &step))
        return NULL;
    ring_t ring;
    int64_t dropped = -1;
    if (check_step(step) == 0 && ring_of(&counters, &samples, &ring) == 0) {
        const float *in = x.buf;
        Py_ssize_t left = x.len / (Py_ssize_t)sizeof(float);
        dropped = 0;
        self->stored = 0; /* (the transmit FIFO keeps nothing in the store between calls) */
        while (left > 0) {
            Py_ssize_t n = room(self, step);
            n = n < left ? n : left;
            if (n <= 0)
                break; /* (cannot happen: the store is empty and step bounded) */
            memcpy(self->carried + self->carried_len, in, (size_t)n * sizeof(float));
            self->carried_len += n;
            in += n;
            left -= n;
            resample(self, step);
            dropped += ring_push(&ring, self->store, 1, self->stored);
            self->stored = 0;
        }
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&counters);
    PyBuffer_Release(&samples);
    return dropped < 0 ? NULL : PyLong_FromLongLong(dropped);
}

/* take(counters, samples, step, out) -> how many: all the ring holds pulled into the
 * store, then the oldest waiting output into out. */
static PyObject *Resampler_take(Resampler *self, PyObject *args)
{
    Py_buffer counters, samples, out;
    double step;
    if (!PyArg_ParseTuple(args, "w*w*dw*:take", &counters, &samples, &step, &out))
        return NULL;
    ring_t ring;
    Py_ssize_t n = -1;
    if (check_step(step) == 0 && ring_of(&counters, &samples, &ring) == 0) {
        pull_all(self, &ring, step);
        Py_ssize_t want = out.len / (Py_ssize_t)sizeof(float);
        n = want < self->stored ? want : self->stored;
        memcpy(out.buf, self->store, (size_t)n * sizeof(float));
        self->stored -= n;
        memmove(self->store, self->store + n, (size_t)self->stored * sizeof(float));
    }
    PyBuffer_Release(&counters);
    PyBuffer_Release(&samples);
    PyBuffer_Release(&out);
    return n < 0 ? NULL : PyLong_FromSsize_t(n);
}

/* cut(n) -> how many: drop up to n of the oldest waiting outputs. */
static PyObject *Resampler_cut(Resampler *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    n = n < 0 ? 0 : n < self->stored ? n : self->stored;
    self->stored -= n;
    memmove(self->store, self->store + n, (size_t)self->stored * sizeof(float));
    return PyLong_FromSsize_t(n);
}

/* pad(n): n samples of silence ahead of what waits (the gap is now, where the audio ran
 * out), as far as the store has room. */
static PyObject *Resampler_pad(Resampler *self, PyObject *arg)
{
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    n = n < 0 ? 0 : n < STORE - self->stored ? n : STORE - self->stored;
    memmove(self->store + n, self->store, (size_t)self->stored * sizeof(float));
    memset(self->store, 0, (size_t)n * sizeof(float));
    self->stored += n;
    Py_RETURN_NONE;
}

static PyObject *Resampler_get_stored(Resampler *self, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(self->stored);
}

static PyMethodDef Resampler_methods[] = {
    {"capture", (PyCFunction)Resampler_capture, METH_VARARGS,
     "capture(counters, samples, step, status, clock) -> (frame, when): the last finished "
     "callback's stamp, and all audio captured up to it pulled into the store"},
    {"push", (PyCFunction)Resampler_push, METH_VARARGS,
     "push(x, counters, samples, step) -> n: x resampled into a ring; n did not fit"},
    {"take", (PyCFunction)Resampler_take, METH_VARARGS,
     "take(counters, samples, step, out) -> n: all a ring holds pulled into the store, "
     "then the oldest n outputs waiting there into out"},
    {"cut", (PyCFunction)Resampler_cut, METH_O, "cut(n) -> how many of the oldest were dropped"},
    {"pad", (PyCFunction)Resampler_pad, METH_O, "pad(n): silence ahead of what waits"},
    {NULL, NULL, 0, NULL},
};

static PyObject *Resampler_get_overflowed(Resampler *self, void *closure)
{
    (void)closure;
    return PyLong_FromLongLong(self->overflowed);
}

static PyGetSetDef Resampler_getset[] = {
    {"stored", (getter)Resampler_get_stored, NULL, "outputs waiting in the store", NULL},
    {"overflowed", (getter)Resampler_get_overflowed, NULL,
     "outputs the store lost to a stall's backlog (their older half, when it filled)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ResamplerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "gateway.hardware._elastic.Resampler",
    .tp_doc = "Resampler(table, slope, taps): a variable-ratio windowed-sinc resampler with "
              "its carried input and a store for its output",
    .tp_basicsize = sizeof(Resampler),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Resampler_init,
    .tp_dealloc = (destructor)Resampler_dealloc,
    .tp_methods = Resampler_methods,
    .tp_getset = Resampler_getset,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_elastic",
    .m_doc = "An elastic FIFO's audio path in C: the variable-ratio resampler and its moves.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__elastic(void)
{
    if (PyType_Ready(&ResamplerType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Resampler", (PyObject *)&ResamplerType) < 0
        || PyModule_AddIntConstant(m, "STORE", STORE) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
