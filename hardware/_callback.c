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
 * counters, then float32 samples), the counters are card_process.py's. The structs
 * below are built by card_process.py (ctypes) and passed as PortAudio's userData.
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

/* ring.py's counters */
enum { WRITTEN, READ, SKIP_ASKED, SKIP_DONE };
/* card_process.py's counters */
enum { XRUNS, TX_UNDERRUNS, RX_DROPPED, WINDOW, TX_LOW, TX_LOW_WINDOW, FINISHED, FRAMES, TOTAL,
       STAMP, STAMP_FRAME, TX_MISSING };

typedef struct {
    int64_t *counters;
    float *samples;
    int64_t capacity;
} ring_t;

typedef struct {
    ring_t rx, tx;
    int64_t *status;          /* this lane's counts: TX_UNDERRUNS, TX_MISSING, TX_LOW… */
    int32_t input_channel, output_channel;
    int32_t serving;          /* played a whole period since it last ran dry */
    int32_t unused;
    int64_t window, low;      /* the least playback level over the tick's window */
} lane_t;

typedef struct {
    int64_t *status;          /* the stream's counts: XRUNS, FRAMES, TOTAL */
    double *clock;            /* CLOCK_MONOTONIC (Python's time.monotonic) of the last call,
                                 when frame STAMP_FRAME was the next to play and record */
    int32_t input_channels, output_channels;
    int32_t lanes, unused;
    lane_t *lane;
} stream_t;

static inline int64_t load(int64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void store(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

/* Append every stride-th sample of src (n of them) as far as they fit; returns how
 * many did not. The counter moves after the samples, so the reader never sees one
 * not yet written. */
static int64_t ring_push(ring_t *r, const float *src, int stride, int64_t n)
{
    int64_t written = r->counters[WRITTEN];
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
static int64_t ring_pop(ring_t *r, float *dst, int stride, int64_t n)
{
    int64_t *c = r->counters;
    int64_t read = c[READ];
    int64_t written = load(&c[WRITTEN]);
    int64_t asked = load(&c[SKIP_ASKED]);
    if (asked != c[SKIP_DONE]) {
        int64_t skip = asked - c[SKIP_DONE];
        read += skip < written - read ? skip : written - read;
        c[SKIP_DONE] = asked;
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

static void serve_lane(lane_t *lane, const float *in, int in_channels, float *out,
                       int out_channels, int64_t frames)
{
    int64_t *s = lane->status;
    if (in != NULL)
        s[RX_DROPPED] += ring_push(&lane->rx, in + lane->input_channel, in_channels, frames);
    if (out == NULL)
        return;
    int64_t got = ring_pop(&lane->tx, out + lane->output_channel, out_channels, frames);
    if (got < frames) {
        /* an underrun is counted once per run dry, not again until a whole period played;
         * the frames it lacked are all counted: how far the FIFO fell short */
        if (lane->serving)
            s[TX_UNDERRUNS] += 1;
        s[TX_MISSING] += frames - got;
        lane->serving = 0;
        return;
    }
    lane->serving = 1;
    int64_t level = load(&lane->tx.counters[WRITTEN]) - lane->tx.counters[READ];
    int64_t window = s[WINDOW];
    lane->low = (window != lane->window || level < lane->low) ? level : lane->low;
    lane->window = window;
    s[TX_LOW] = lane->low;
    s[TX_LOW_WINDOW] = window;
}

/* PortAudio's PaStreamCallback, for interleaved float32 buffers. */
static int stream_callback(const void *input, void *output, unsigned long frames,
                           const void *time_info, unsigned long status_flags, void *user_data)
{
    (void)time_info;
    stream_t *st = user_data;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    /* The time and the frame it belongs to change together: STAMP is odd while they are
     * written, so a reader that saw it even and unchanged around its reads has a pair. */
    int64_t *s = st->status;
    __atomic_store_n(&s[STAMP], s[STAMP] + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    st->clock[0] = (double)now.tv_sec + (double)now.tv_nsec * 1e-9;
    s[STAMP_FRAME] = s[TOTAL];
    store(&s[STAMP], s[STAMP] + 1);
    st->status[FRAMES] = (int64_t)frames;
    if (status_flags)
        st->status[XRUNS] += 1;
    if (output != NULL)
        memset(output, 0, frames * (size_t)st->output_channels * sizeof(float));
    for (int i = 0; i < st->lanes; i++)
        serve_lane(&st->lane[i], input, st->input_channels, output, st->output_channels,
                   (int64_t)frames);
    store(&st->status[TOTAL], st->status[TOTAL] + (int64_t)frames);
    return 0; /* paContinue */
}

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_callback",
    .m_doc = "The sound card's stream callback in C; CALLBACK is its address.",
    .m_size = -1,
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
        || PyModule_AddIntConstant(m, "LANE_SIZE", sizeof(lane_t)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
