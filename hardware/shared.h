/* The card's shared block as C sees it from both ends: the rings (ring.py's SharedRing)
 * and the stream's status counters (card_main.py), with the memory order both sides need.
 *
 * A ring is four int64 counters (samples written, samples read, skips asked, skips done)
 * then float32 samples. Each side owns one counter and moves it only after it has touched
 * the samples: a writer stores its samples, then the counter with release order; a reader
 * loads the counter with acquire order, then the samples. x86-64 would keep that order
 * anyway; arm64 (a Raspberry Pi-class site box) does not. Included by the card's callback
 * (_callback.c) and by the gateway's side of the FIFOs (_elastic.c), so both ends of a
 * ring, and of the callback's stamp, are these same functions.
 */
#ifndef BORDERLINK_SHARED_H
#define BORDERLINK_SHARED_H

#include <stdint.h>

/* ring.py's counters */
enum { WRITTEN, READ, SKIP_ASKED, SKIP_DONE };
/* card_main.py's counters (the stream's status) */
enum { XRUNS, TX_UNDERRUNS, RX_DROPPED, FINISHED, FRAMES, TOTAL, STAMP, STAMP_FRAME, COUNTERS };
typedef struct {
    int64_t *counters;
    float *samples;
    int64_t capacity;
} ring_t;

static inline int64_t load(int64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void store(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
/* a counter only this side writes: no order needed, but still one untorn access */
static inline int64_t own(int64_t *p) { return __atomic_load_n(p, __ATOMIC_RELAXED); }

/* Append every stride-th sample of src (n of them) as far as they fit; returns how
 * many did not. The counter moves after the samples, so the reader never sees one
 * not yet written. */
static inline int64_t ring_push(ring_t *r, const float *src, int stride, int64_t n)
{
    int64_t written = own(&r->counters[WRITTEN]);
    int64_t room = r->capacity - (written - load(&r->counters[READ]));
    int64_t take = n < room ? n : room;
    int64_t at = written % r->capacity;
    for (int64_t i = 0; i < take; i++) {
        r->samples[at] = src[i * stride];
        if (++at == r->capacity)
            at = 0;
    }
    store(&r->counters[WRITTEN], written + take);
    return n - take;
}

/* Fill every stride-th sample of dst (n of them) from the front, after any skip the
 * writer asked for; returns how many were there. */
static inline int64_t ring_pop(ring_t *r, float *dst, int stride, int64_t n)
{
    int64_t *c = r->counters;
    int64_t read = own(&c[READ]);
    int64_t written = load(&c[WRITTEN]);
    int64_t asked = load(&c[SKIP_ASKED]);
    int64_t done = own(&c[SKIP_DONE]);
    if (asked != done) {
        int64_t skip = asked - done;
        read += skip < written - read ? skip : written - read;
        store(&c[SKIP_DONE], asked);
    }
    int64_t got = written - read < n ? written - read : n;
    int64_t at = read % r->capacity;
    for (int64_t i = 0; i < got; i++) {
        dst[i * stride] = r->samples[at];
        if (++at == r->capacity)
            at = 0;
    }
    store(&c[READ], read + got);
    return got;
}

/* The last callback's (first frame, time) as one pair: the callback writes them between
 * two steps of STAMP (odd while writing), so a pair read between two equal, even
 * loads of STAMP is whole. */
static inline void read_stamp(int64_t *status, double *clock, int64_t *frame, double *when)
{
    int64_t seq;
    do {
        seq = load(&status[STAMP]);
        *frame = __atomic_load_n(&status[STAMP_FRAME], __ATOMIC_RELAXED);
        __atomic_load(clock, when, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
    } while ((seq & 1) || own(&status[STAMP]) != seq);
}

#ifdef Py_PYTHON_H
/* A ring handed over from Python as two writable buffers: its counters, its samples. */
static inline int ring_of(Py_buffer *counters, Py_buffer *samples, ring_t *r)
{
    if (counters->len < (Py_ssize_t)(4 * sizeof(int64_t))
        || (uintptr_t)counters->buf % sizeof(int64_t) != 0
        || samples->len < (Py_ssize_t)sizeof(float)) {
        PyErr_SetString(PyExc_ValueError, "not a ring: 4 aligned int64 counters, then samples");
        return -1;
    }
    r->counters = counters->buf;
    r->samples = samples->buf;
    r->capacity = samples->len / (Py_ssize_t)sizeof(float);
    return 0;
}
#endif

#endif
