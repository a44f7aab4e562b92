/* The receive batch's per-packet column work in C (see bank_rx.py, bank_ext.py, legtable.py).
 *
 * Every tick the leg bank reads a batch of datagrams with recvmmsg and, before this file,
 * ran some fifty small NumPy steps over it: gather the headers, find each packet's leg by
 * (source address, SSRC) with two searchsorted, compare the talker extension blocks with
 * the ones last handed over, strip them, classify the malformed and read the header
 * fields. Each step costs a few microseconds whatever the packet count, so at 10 ms
 * frames (100 ticks a second) the fixed cost was most of the receiving gateway's time.
 * The same rules as three plain loops over the batch, one call each:
 *
 *   lookup()    which leg each packet belongs to (LegTable's sorted index);
 *   ext_news()  which talker extension blocks differ from the leg's last one;
 *   classify()  drop classes, header fields, extension blocks taken out in place.
 *
 * All arrays are NumPy buffers, C-contiguous; sizes are checked here, so a caller's
 * mistake raises ValueError instead of reading out of bounds. Packet bytes are treated
 * as hostile: no read or write leaves a packet's row of the receive buffer. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

#define HEADER 12
#define MAX_EXTENSION 80 /* bank_ext.MAX_EXTENSION: bytes of a block kept per leg */
#define PLAIN 0x80       /* V=2, no padding, no extension, no CSRCs */
#define PLAIN_WITH_EXTENSION 0x90

/* legtable.py: how a packet matched the index */
enum { UNKNOWN = -1, ADDRESS_ONLY = 0, ANY_SSRC = 1, EXACT = 2 };
/* bank_rx.py: what classify() found */
enum { FAST = 0, HUGE = 1, SHORT = 2, VERSION = 3, REST = 4 };

static int sized(Py_buffer *b, Py_ssize_t count, Py_ssize_t item, const char *what)
{
    if (b->len < count * item) {
        PyErr_Format(PyExc_ValueError, "%s: %zd bytes, need %zd", what, b->len, count * item);
        return 0;
    }
    return 1;
}

static int wide_enough(Py_ssize_t width, Py_ssize_t need, const char *what)
{
    if (width < need) {
        PyErr_Format(PyExc_ValueError, "%s: rows of %zd bytes, need %zd", what, width, need);
        return 0;
    }
    return 1;
}

/* First index of `sorted` (ascending, n) not less than `key`. */
static Py_ssize_t lower_bound(const int64_t *sorted, Py_ssize_t n, int64_t key)
{
    Py_ssize_t lo = 0, hi = n;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (sorted[mid] < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

static uint32_t be32(const uint8_t *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

/* lookup(data, width, source, addresses, keys, key_rows, sole, rows, match)
 *
 * For each of the n = len(source) packets (rows of `data`, `width` bytes apart): its SSRC
 * (RTP's at byte 8; RTCP's sender at byte 4, second octet 192..223) and source address key
 * against the index LegTable.update() built: `addresses` sorted, `keys` sorted
 * (address rank << 33 | SSRC + 1, 0: any SSRC) with their `key_rows`, `sole` per address.
 * Writes rows (-1: none) and match (EXACT, ANY_SSRC, ADDRESS_ONLY, UNKNOWN). */
static PyObject *py_lookup(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer data, source, addresses, keys, key_rows, sole, rows, match;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "y*ny*y*y*y*y*w*w*:lookup", &data, &width, &source, &addresses,
                          &keys, &key_rows, &sole, &rows, &match))
        return NULL;
    Py_ssize_t n = source.len / 8, na = addresses.len / 8, nk = keys.len / 8;
    int ok = wide_enough(width, HEADER, "lookup") && sized(&data, n, width, "lookup: data") &&
             sized(&key_rows, nk, 8, "lookup: key_rows") && sized(&sole, na, 8, "lookup: sole") &&
             sized(&rows, n, 8, "lookup: rows") && sized(&match, n, 8, "lookup: match");
    if (ok) {
        const uint8_t *d = data.buf;
        const int64_t *src = source.buf, *addr = addresses.buf, *k = keys.buf;
        const int64_t *kr = key_rows.buf, *so = sole.buf;
        int64_t *r = rows.buf, *m = match.buf;
        for (Py_ssize_t i = 0; i < n; i++) {
            const uint8_t *p = d + i * width;
            int rtcp = p[1] >= 192 && p[1] <= 223;
            int64_t ssrc = be32(p + (rtcp ? 4 : 8));
            r[i] = -1;
            m[i] = UNKNOWN;
            Py_ssize_t rank = lower_bound(addr, na, src[i]);
            if (rank >= na || addr[rank] != src[i])
                continue;
            m[i] = ADDRESS_ONLY;
            r[i] = so[rank];
            int64_t base = (int64_t)rank << 33;
            Py_ssize_t at = lower_bound(k, nk, base);
            if (at < nk && k[at] == base) {
                r[i] = kr[at];
                m[i] = ANY_SSRC;
            }
            int64_t exact = base | (ssrc + 1);
            at = lower_bound(k, nk, exact);
            if (at < nk && k[at] == exact) {
                r[i] = kr[at];
                m[i] = EXACT;
            }
        }
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&source);
    PyBuffer_Release(&addresses);
    PyBuffer_Release(&keys);
    PyBuffer_Release(&key_rows);
    PyBuffer_Release(&sole);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&match);
    if (!ok)
        return NULL;
    Py_RETURN_NONE;
}

/* ext_news(data, width, length, rows, match, ext_in, heard, heard_len, size, news) -> count
 *
 * The packets whose talker block is taken out: plain header with the X bit (0x90), the
 * leg's exact (address, SSRC), a leg that reads extensions (`ext_in`), and a block that
 * leaves a payload after it. `size[i]`: its block's bytes (0: none to take). `news[i]`:
 * the block differs from the one before it from the same leg — in this batch, else
 * `heard` (rows x MAX_EXTENSION, `heard_len` bytes; 0: hand over the next). Each leg's
 * last block becomes its `heard` one. Returns how many are news. */
static PyObject *py_ext_news(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer data, length, rows, match, ext_in, heard, heard_len, size, news;
    Py_ssize_t width;
    if (!PyArg_ParseTuple(args, "y*ny*y*y*y*w*w*w*w*:ext_news", &data, &width, &length, &rows,
                          &match, &ext_in, &heard, &heard_len, &size, &news))
        return NULL;
    Py_ssize_t n = length.len / 8, capacity = ext_in.len, count = 0;
    int ok = wide_enough(width, HEADER + 4 + MAX_EXTENSION, "ext_news") &&
             sized(&data, n, width, "ext_news: data") && sized(&rows, n, 8, "ext_news: rows") &&
             sized(&match, n, 8, "ext_news: match") &&
             sized(&heard, capacity, MAX_EXTENSION, "ext_news: heard") &&
             sized(&heard_len, capacity, 8, "ext_news: heard_len") &&
             sized(&size, n, 8, "ext_news: size") && sized(&news, n, 1, "ext_news: news");
    if (ok) {
        const uint8_t *d = data.buf, *in = ext_in.buf;
        const int64_t *len = length.buf, *r = rows.buf, *m = match.buf;
        uint8_t *h = heard.buf, *nw = news.buf;
        int64_t *hl = heard_len.buf, *sz = size.buf;
        for (Py_ssize_t i = 0; i < n; i++) {
            const uint8_t *p = d + i * width;
            int64_t row = r[i];
            sz[i] = 0;
            nw[i] = 0;
            if (p[0] != PLAIN_WITH_EXTENSION || m[i] != EXACT || row < 0 || row >= capacity ||
                !in[row])
                continue;
            int64_t s = 4 + 4 * (((int64_t)p[HEADER + 2] << 8) | p[HEADER + 3]);
            if (HEADER + s >= len[i]) /* runs into the payload or past the end: the */
                continue;             /* one-packet parser drops it (layout) */
            sz[i] = s;
            uint8_t *last = h + row * MAX_EXTENSION;
            int same = s <= MAX_EXTENSION && hl[row] == s && memcmp(last, p + HEADER, s) == 0;
            if (!same) {
                nw[i] = 1;
                count++;
            }
            int64_t keep = s <= MAX_EXTENSION ? s : MAX_EXTENSION;
            memcpy(last, p + HEADER, keep);
            memset(last + keep, 0, MAX_EXTENSION - keep);
            hl[row] = s <= MAX_EXTENSION ? s : 0;
        }
    }
    PyBuffer_Release(&data);
    PyBuffer_Release(&length);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&match);
    PyBuffer_Release(&ext_in);
    PyBuffer_Release(&heard);
    PyBuffer_Release(&heard_len);
    PyBuffer_Release(&size);
    PyBuffer_Release(&news);
    if (!ok)
        return NULL;
    return PyLong_FromSsize_t(count);
}

/* classify(data, width, length, truncated, rows, match, ext_size, payload_type,
 *          max_packet, max_payload, kind, seq, ts, ssrc, marker, rank) -> rounds
 *
 * Per packet: `kind` HUGE (truncated by the kernel, or over max_packet), SHORT (under
 * an RTP header), VERSION (not RTP version 2), else FAST (plain header, the leg's
 * exact address and SSRC, its agreed payload type, a payload of 1..max_payload bytes)
 * or REST (the one-packet parser's). Malformed classes are judged on the packet as
 * received; FAST after its talker block (`ext_size` bytes, from ext_news) is taken out
 * in place, `length` shortened to match. For FAST packets: sequence, timestamp, SSRC,
 * marker, and `rank` (how many FAST packets of the same leg came before it in the
 * batch: the jitter bank takes one packet per leg per round). Returns the rounds (0:
 * no FAST packet). */
static PyObject *py_classify(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer data, length, truncated, rows, match, ext_size, payload_type;
    Py_buffer kind, seq, ts, ssrc, marker, rank;
    Py_ssize_t width;
    long long max_packet, max_payload;
    if (!PyArg_ParseTuple(args, "w*nw*y*y*y*y*y*LLw*w*w*w*w*w*:classify", &data, &width,
                          &length, &truncated, &rows, &match, &ext_size, &payload_type,
                          &max_packet, &max_payload, &kind, &seq, &ts, &ssrc, &marker, &rank))
        return NULL;
    Py_ssize_t n = length.len / 8, capacity = payload_type.len / 8, rounds = 0;
    int64_t *seen = NULL;
    int ok = wide_enough(width, HEADER, "classify") && sized(&data, n, width, "classify: data") &&
             sized(&truncated, n, 1, "classify: truncated") &&
             sized(&rows, n, 8, "classify: rows") && sized(&match, n, 8, "classify: match") &&
             sized(&ext_size, n, 8, "classify: ext_size") && sized(&kind, n, 8, "classify: kind") &&
             sized(&seq, n, 8, "classify: seq") && sized(&ts, n, 8, "classify: ts") &&
             sized(&ssrc, n, 8, "classify: ssrc") && sized(&marker, n, 1, "classify: marker") &&
             sized(&rank, n, 8, "classify: rank");
    if (ok) {
        seen = calloc(capacity > 0 ? (size_t)capacity : 1, sizeof(int64_t));
        if (seen == NULL) {
            PyErr_NoMemory();
            ok = 0;
        }
    }
    if (ok) {
        uint8_t *d = data.buf, *mk = marker.buf;
        const uint8_t *tr = truncated.buf;
        int64_t *len = length.buf, *k = kind.buf, *sq = seq.buf, *t = ts.buf, *ss = ssrc.buf;
        int64_t *rk = rank.buf;
        const int64_t *r = rows.buf, *m = match.buf, *ext = ext_size.buf, *pt = payload_type.buf;
        for (Py_ssize_t i = 0; i < n; i++) {
            uint8_t *p = d + i * width;
            uint8_t b0 = p[0];
            int64_t row = r[i];
            if (tr[i] || len[i] > max_packet)
                k[i] = HUGE;
            else if (len[i] < HEADER)
                k[i] = SHORT;
            else if ((b0 >> 6) != 2)
                k[i] = VERSION;
            else
                k[i] = REST;
            int64_t s = ext[i];
            if (s > 0) { /* the block out, the payload after the fixed header */
                Py_ssize_t end = len[i] < width ? (Py_ssize_t)len[i] : width;
                if (HEADER + s < end)
                    memmove(p + HEADER, p + HEADER + s, (size_t)(end - HEADER - s));
                len[i] -= s;
                b0 = PLAIN;
            }
            sq[i] = ((int64_t)p[2] << 8) | p[3];
            t[i] = be32(p + 4);
            ss[i] = be32(p + 8);
            mk[i] = (p[1] & 0x80) != 0;
            rk[i] = 0;
            if (k[i] == REST && m[i] == EXACT && row >= 0 && row < capacity && b0 == PLAIN &&
                len[i] > HEADER && len[i] <= HEADER + max_payload && (p[1] & 0x7F) == pt[row]) {
                k[i] = FAST;
                rk[i] = seen[row]++;
                if (rk[i] + 1 > rounds)
                    rounds = rk[i] + 1;
            }
        }
    }
    free(seen);
    PyBuffer_Release(&data);
    PyBuffer_Release(&length);
    PyBuffer_Release(&truncated);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&match);
    PyBuffer_Release(&ext_size);
    PyBuffer_Release(&payload_type);
    PyBuffer_Release(&kind);
    PyBuffer_Release(&seq);
    PyBuffer_Release(&ts);
    PyBuffer_Release(&ssrc);
    PyBuffer_Release(&marker);
    PyBuffer_Release(&rank);
    if (!ok)
        return NULL;
    return PyLong_FromSsize_t(rounds);
}

/* --- the send batch ------------------------------------------------------------------ */

/* build(packets, width, payloads, size, rows, payload_type, first, seq, ts, ssrc, ext_len,
 *       ext_block, length)
 *
 * One packet per row of `packets` (`width` bytes apart) for leg rows[i]: its RTP header
 * (V=2, the leg's payload type, the marker on its `first` packet, sequence number,
 * timestamp and SSRC), the leg's header extension block if it has one (`ext_len` bytes of
 * `ext_block`, X bit set), then the payload: `payloads[i]` (bytes; None: `silence`), or,
 * when `payloads` is None, the `size[i]` bytes already at byte 12 (moved behind the
 * block). Writes each packet's `length`; refuses a packet that would not fit its row. */
static PyObject *py_build(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer packets, size, rows, pt, first, seq, ts, ssrc, ext_len, ext_block, length;
    Py_ssize_t width;
    PyObject *payloads, *silence;
    if (!PyArg_ParseTuple(args, "w*nOOy*y*y*y*y*y*y*y*y*w*:build", &packets, &width, &payloads,
                          &silence, &size, &rows, &pt, &first, &seq, &ts, &ssrc, &ext_len,
                          &ext_block, &length))
        return NULL;
    Py_ssize_t n = rows.len / 8, cap = pt.len / 8;
    int ok = wide_enough(width, HEADER, "build") && sized(&packets, n, width, "build: packets") &&
             sized(&size, n, 8, "build: size") && sized(&first, cap, 1, "build: first") &&
             sized(&seq, cap, 8, "build: seq") && sized(&ts, cap, 8, "build: ts") &&
             sized(&ssrc, cap, 8, "build: ssrc") && sized(&ext_len, cap, 8, "build: ext_len") &&
             sized(&ext_block, cap, MAX_EXTENSION, "build: ext_block") &&
             sized(&length, n, 8, "build: length");
    PyObject *list = NULL;
    if (ok && payloads != Py_None) {
        list = PySequence_Fast(payloads, "build: payloads must be a list");
        if (list == NULL)
            ok = 0;
        else if (PySequence_Fast_GET_SIZE(list) != n) {
            PyErr_SetString(PyExc_ValueError, "build: one payload per packet");
            ok = 0;
        }
    }
    char *quiet = NULL;
    Py_ssize_t quiet_len = 0;
    if (ok && list != NULL && PyBytes_AsStringAndSize(silence, &quiet, &quiet_len) < 0)
        ok = 0;
    uint8_t *d = packets.buf;
    const int64_t *sz = size.buf, *r = rows.buf, *p = pt.buf, *sq = seq.buf, *t = ts.buf;
    const int64_t *ss = ssrc.buf, *el = ext_len.buf;
    const uint8_t *fi = first.buf, *eb = ext_block.buf;
    int64_t *len = length.buf;
    for (Py_ssize_t i = 0; ok && i < n; i++) {
        int64_t row = r[i];
        if (row < 0 || row >= cap) {
            PyErr_SetString(PyExc_ValueError, "build: a row out of range");
            ok = 0;
            break;
        }
        int64_t ext = el[row];
        const char *payload = NULL;
        Py_ssize_t bytes = sz[i];
        if (list != NULL) {
            PyObject *item = PySequence_Fast_GET_ITEM(list, i);
            if (item == Py_None) {
                payload = quiet;
                bytes = quiet_len;
            } else if (PyBytes_AsStringAndSize(item, (char **)&payload, &bytes) < 0) {
                ok = 0;
                break;
            }
        }
        if (ext < 0 || ext > MAX_EXTENSION || ext % 4 || bytes < 0 ||
            HEADER + ext + bytes > width) {
            PyErr_SetString(PyExc_ValueError, "build: a packet does not fit its row");
            ok = 0;
            break;
        }
        uint8_t *q = d + i * width;
        if (payload != NULL)
            memcpy(q + HEADER + ext, payload, (size_t)bytes);
        else if (ext)
            memmove(q + HEADER + ext, q + HEADER, (size_t)bytes);
        if (ext)
            memcpy(q + HEADER, eb + row * MAX_EXTENSION, (size_t)ext);
        q[0] = ext ? PLAIN_WITH_EXTENSION : PLAIN;
        q[1] = (uint8_t)((p[row] & 0x7F) | (fi[row] ? 0x80 : 0));
        q[2] = (uint8_t)(sq[row] >> 8);
        q[3] = (uint8_t)sq[row];
        for (int k = 0; k < 4; k++) {
            q[4 + k] = (uint8_t)(t[row] >> (24 - 8 * k));
            q[8 + k] = (uint8_t)(ss[row] >> (24 - 8 * k));
        }
        len[i] = HEADER + ext + bytes;
    }
    Py_XDECREF(list);
    PyBuffer_Release(&packets);
    PyBuffer_Release(&size);
    PyBuffer_Release(&rows);
    PyBuffer_Release(&pt);
    PyBuffer_Release(&first);
    PyBuffer_Release(&seq);
    PyBuffer_Release(&ts);
    PyBuffer_Release(&ssrc);
    PyBuffer_Release(&ext_len);
    PyBuffer_Release(&ext_block);
    PyBuffer_Release(&length);
    if (!ok)
        return NULL;
    Py_RETURN_NONE;
}

/* --- SRTP in place -------------------------------------------------------------------- */

/* libsrtp's srtp_protect, srtp_unprotect, srtp_unprotect_rtcp...: (context, packet, length) */
typedef int (*srtp_call)(void *context, void *packet, int *length);

/* srtp_rows(calls, pick, data, width, which, contexts, length, status, room)
 *
 * libsrtp on rows `which` of `data` (`width` bytes apart), in place: packet i with
 * calls[pick[i]] (function addresses, from pylibsrtp's own library) and the context at
 * address contexts[i]. `length[i]` in and out (unchanged when the call fails); `status[i]`
 * libsrtp's (0: good). `room`: bytes the call may add after the packet (the tag), which
 * must fit its row. One C loop instead of a Python call per packet. */
static PyObject *py_srtp_rows(PyObject *self, PyObject *args)
{
    (void)self;
    unsigned long long first_call, second_call;
    Py_buffer pick, data, which, contexts, length, status;
    Py_ssize_t width, room;
    if (!PyArg_ParseTuple(args, "(KK)y*w*ny*y*w*w*n:srtp_rows", &first_call, &second_call, &pick,
                          &data, &width, &which, &contexts, &length, &status, &room))
        return NULL;
    Py_ssize_t n = which.len / 8, rows = width > 0 ? data.len / width : 0;
    int ok = wide_enough(width, HEADER, "srtp_rows") && sized(&pick, n, 1, "srtp_rows: pick") &&
             sized(&contexts, n, 8, "srtp_rows: contexts") &&
             sized(&length, n, 8, "srtp_rows: length") && sized(&status, n, 8, "srtp_rows: status");
    if (ok && (first_call == 0 || second_call == 0 || room < 0)) {
        PyErr_SetString(PyExc_ValueError, "srtp_rows: no function");
        ok = 0;
    }
    uint8_t *d = data.buf;
    const uint8_t *pk = pick.buf;
    const int64_t *w = which.buf, *ctx = contexts.buf;
    int64_t *len = length.buf, *st = status.buf;
    srtp_call calls[2] = {(srtp_call)(uintptr_t)first_call, (srtp_call)(uintptr_t)second_call};
    for (Py_ssize_t i = 0; ok && i < n; i++) {
        if (w[i] < 0 || w[i] >= rows || len[i] < 0 || len[i] + room > width || ctx[i] == 0) {
            PyErr_SetString(PyExc_ValueError, "srtp_rows: a packet outside its row, or no key");
            ok = 0;
            break;
        }
        int size = (int)len[i];
        st[i] = calls[pk[i] != 0]((void *)(uintptr_t)ctx[i], d + w[i] * width, &size);
        if (st[i] == 0)
            len[i] = size;
    }
    PyBuffer_Release(&pick);
    PyBuffer_Release(&data);
    PyBuffer_Release(&which);
    PyBuffer_Release(&contexts);
    PyBuffer_Release(&length);
    PyBuffer_Release(&status);
    if (!ok)
        return NULL;
    Py_RETURN_NONE;
}

/* --- the jitter bank's playout (jitter.py) ------------------------------------------ */

/* A buffer argument of at least `need` bytes, writable if asked. */
static int take_buffer(PyObject *obj, Py_buffer *b, int writable, Py_ssize_t need,
                       const char *what)
{
    if (PyObject_GetBuffer(obj, b, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return 0;
    if (b->len < need) {
        PyErr_Format(PyExc_ValueError, "playout: %s has %zd bytes, needs %zd", what, b->len,
                     need);
        PyBuffer_Release(b);
        return 0;
    }
    return 1;
}

enum {
    J_RING, J_HAVE, J_STARTED, J_TRANSIT, J_BASE, J_ALIGN, J_PACKET, J_FRESH, J_PLAY,
    J_WHOLE, J_COUNT, J_LAST_ARRIVAL, J_FADE, J_CONCEALED, J_LAST_POS, J_DELAY,
    J_ROWS, J_TALKING, J_TABLE, J_LAW, J_LAST, J_OUT, J_COUNT_OF
};

enum {
    P_RING, P_HAVE, P_PLAY, P_STARTED, P_FRESH, P_BASE, P_TRANSIT, P_COUNT, P_LAST_ARRIVAL,
    P_PACKET, P_ALIGN, P_PACKETS_LATE, P_LATE_RUN, P_COLUMNS,
    P_ROWS = P_COLUMNS, P_TIMESTAMPS, P_CODES, P_ARRIVAL, P_MARKER, P_KEEP, P_COUNT_OF
};

/* put(columns, rows, timestamps, codes, arrival, marker, keep, frame, constants)
 *
 * jitter.JitterBank.put_batch's loop: one packet (`codes`, rows x n) for each of `rows`
 * (all distinct), at RTP time `timestamps`, arrived at `arrival`, with its `marker`.
 * `columns` is the bank's (ring, have, play, started, fresh, base, transit, count,
 * last_arrival, packet, align, packets_late, late_run); `keep[i]`: the packet was kept
 * (not too late). `constants`: (RING, TAIL, HISTORY, LATE_RESYNC). */
static PyObject *py_put(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *columns, *objects[P_COUNT_OF - P_COLUMNS];
    Py_ssize_t frame, ring_size, tail, history, late_resync;
    if (!PyArg_ParseTuple(args, "O!OOOOOOn(nnnn):put", &PyTuple_Type, &columns, &objects[0],
                          &objects[1], &objects[2], &objects[3], &objects[4], &objects[5], &frame,
                          &ring_size, &tail, &history, &late_resync))
        return NULL;
    if (PyTuple_GET_SIZE(columns) != P_COLUMNS || tail > ring_size ||
        (ring_size & (ring_size - 1)) || history < 1 || frame < 1) {
        PyErr_SetString(PyExc_ValueError, "put: 13 columns; TAIL <= RING, a power of 2");
        return NULL;
    }
    Py_buffer probe;
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(columns, P_STARTED), &probe, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t cap = probe.len;
    PyBuffer_Release(&probe);
    if (PyObject_GetBuffer(objects[0], &probe, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t k = probe.len / 8;
    PyBuffer_Release(&probe);
    if (PyObject_GetBuffer(objects[2], &probe, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t n = k > 0 ? probe.len / k : 0;
    PyBuffer_Release(&probe);
    Py_ssize_t width = ring_size + tail;
    const struct { int writable; Py_ssize_t need; const char *what; } spec[P_COUNT_OF] = {
        [P_RING] = {1, cap * width, "ring"},
        [P_HAVE] = {1, cap * width, "have"},
        [P_PLAY] = {1, cap * 8, "play"},
        [P_STARTED] = {1, cap, "started"},
        [P_FRESH] = {1, cap, "fresh"},
        [P_BASE] = {1, cap * 8, "base"},
        [P_TRANSIT] = {1, cap * history * 8, "transit"},
        [P_COUNT] = {1, cap * 8, "count"},
        [P_LAST_ARRIVAL] = {1, cap * 8, "last_arrival"},
        [P_PACKET] = {1, cap * 8, "packet"},
        [P_ALIGN] = {1, cap * 8, "align"},
        [P_PACKETS_LATE] = {1, cap * 8, "packets_late"},
        [P_LATE_RUN] = {1, cap * 8, "late_run"},
        [P_ROWS] = {0, k * 8, "rows"},
        [P_TIMESTAMPS] = {0, k * 8, "timestamps"},
        [P_CODES] = {0, k * n, "codes"},
        [P_ARRIVAL] = {0, k * 8, "arrival"},
        [P_MARKER] = {0, k, "marker"},
        [P_KEEP] = {1, k, "keep"},
    };
    Py_buffer b[P_COUNT_OF];
    int got = 0, ok = 1;
    for (; got < P_COUNT_OF && ok; got++) {
        PyObject *obj = got < P_COLUMNS ? PyTuple_GET_ITEM(columns, got) : objects[got - P_COLUMNS];
        ok = take_buffer(obj, &b[got], spec[got].writable, spec[got].need, spec[got].what);
    }
    if (!ok)
        got--;
    if (ok && (n < 1 || n > ring_size - frame)) {
        PyErr_SetString(PyExc_ValueError, "put: packets of 1 .. RING - frame samples");
        ok = 0;
    }
    if (ok) {
        uint8_t *ring = b[P_RING].buf, *have = b[P_HAVE].buf, *started = b[P_STARTED].buf;
        uint8_t *fresh = b[P_FRESH].buf, *keep = b[P_KEEP].buf;
        int64_t *play = b[P_PLAY].buf, *count = b[P_COUNT].buf, *packet = b[P_PACKET].buf;
        int64_t *align = b[P_ALIGN].buf, *late = b[P_PACKETS_LATE].buf;
        int64_t *late_run = b[P_LATE_RUN].buf;
        double *base = b[P_BASE].buf, *transit = b[P_TRANSIT].buf;
        double *last_arrival = b[P_LAST_ARRIVAL].buf;
        const int64_t *rows = b[P_ROWS].buf, *timestamps = b[P_TIMESTAMPS].buf;
        const uint8_t *codes = b[P_CODES].buf, *marker = b[P_MARKER].buf;
        const double *arrival = b[P_ARRIVAL].buf;
        int64_t mask = ring_size - 1;
        for (Py_ssize_t i = 0; i < k; i++) {
            if (rows[i] < 0 || rows[i] >= cap) {
                PyErr_SetString(PyExc_ValueError, "put: a row out of range");
                ok = 0;
                break;
            }
        }
        for (Py_ssize_t i = 0; ok && i < k; i++) {
            int64_t row = rows[i], ts = timestamps[i];
            uint8_t *row_ring = ring + row * width, *row_have = have + row * width;
            int64_t now_play = play[row];
            /* the timestamp unwrapped next to the playout point */
            int64_t ext = now_play + ((ts - now_play + 0x80000000LL) & 0xFFFFFFFFLL) - 0x80000000LL;
            int64_t skip = fresh[row] ? 0 : now_play - ext;
            int restart = !started[row] || ext + n > now_play + ring_size - frame ||
                          (skip >= n && marker[i]);
            if (restart) { /* the first packet, a clock jump, a late talkspurt: a new reference */
                if (started[row])
                    memset(row_have, 0, (size_t)width);
                started[row] = fresh[row] = 1;
                base[row] = arrival[i] - (double)(ts + n);
                play[row] = ts;
                memset(transit + row * history, 0, (size_t)history * sizeof(double));
                count[row] = 0;
                ext = ts;
                skip = 0;
            }
            int64_t end = ext + n;
            transit[row * history + count[row] % history] = arrival[i] - base[row] - (double)end;
            count[row] += 1;
            last_arrival[row] = arrival[i];
            packet[row] = n;
            align[row] = ((end % n) + n) % n;
            if (skip >= n) { /* too late to be played: counted, and dropped */
                late[row] += 1;
                late_run[row] += 1;
                if (late_run[row] >= late_resync) { /* the sender's clock jumped: resync */
                    started[row] = 0;
                    memset(row_have, 0, (size_t)width);
                }
                keep[i] = 0;
                continue;
            }
            keep[i] = 1;
            late_run[row] = 0;
            const uint8_t *c = codes + i * n;
            for (Py_ssize_t j = skip > 0 ? skip : 0; j < n; j++) { /* partly late: the rest */
                int64_t q = (ext + j) & mask;
                row_ring[q] = c[j];
                row_have[q] = 1;
                if (q < tail) {
                    row_ring[q + ring_size] = c[j];
                    row_have[q + ring_size] = 1;
                }
            }
        }
    }
    for (int i = 0; i < got; i++)
        PyBuffer_Release(&b[i]);
    if (!ok)
        return NULL;
    Py_RETURN_NONE;
}

/* playout(columns, rows, talking, table, law, last, out, now, frame, constants)
 *
 * jitter.JitterBank.playout's loop: `columns` is the bank's (ring, have, started,
 * transit, base, align, packet, fresh, play, whole, count, last_arrival, fade, concealed,
 * last_pos, delay), `rows` the rows to play (ascending), `talking` theirs, `table` the
 * laws x 256 decode table and `law` each row's index into it, `last` the previous tick's
 * `out` (what concealment repeats, rows at `last_pos`), `out` this tick's frames (rows x
 * frame, zero where a row never started). `constants`: (RING, TAIL, HISTORY, TARGET_RANK,
 * MARGIN, CREEP_TALKING, WHOLE_CREEP_EVERY, FORWARD_HYSTERESIS, PLC_FADE). Returns how
 * many rows played (started); none: `out` is silence and nothing else changes. */
static PyObject *py_playout(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *columns, *rows_o, *talking_o, *table_o, *law_o, *last_o, *out_o;
    double now;
    Py_ssize_t frame, ring_size, tail, history, rank, margin, creep_talking, creep_every;
    Py_ssize_t hysteresis;
    double plc_fade;
    if (!PyArg_ParseTuple(args, "O!OOOOOOdn(nnnnnnnnd):playout", &PyTuple_Type, &columns,
                          &rows_o, &talking_o, &table_o, &law_o, &last_o, &out_o, &now, &frame,
                          &ring_size, &tail, &history, &rank, &margin, &creep_talking,
                          &creep_every, &hysteresis, &plc_fade))
        return NULL;
    if (PyTuple_GET_SIZE(columns) != J_ROWS) {
        PyErr_SetString(PyExc_ValueError, "playout: 16 columns");
        return NULL;
    }
    if (frame < 1 || frame > tail || tail > ring_size || (ring_size & (ring_size - 1)) ||
        history < rank || rank < 1) {
        PyErr_SetString(PyExc_ValueError, "playout: frame <= TAIL <= RING (a power of 2)");
        return NULL;
    }
    Py_buffer b[J_COUNT_OF];
    int got = 0, ok = 1;
    Py_ssize_t live = 0;
    Py_ssize_t width = ring_size + tail;
    /* the capacity: from `started` (bool per row) */
    Py_buffer probe;
    if (PyObject_GetBuffer(PyTuple_GET_ITEM(columns, J_STARTED), &probe, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t cap = probe.len;
    PyBuffer_Release(&probe);
    Py_buffer rows_probe;
    if (PyObject_GetBuffer(rows_o, &rows_probe, PyBUF_SIMPLE) < 0)
        return NULL;
    Py_ssize_t n = rows_probe.len / 8;
    PyBuffer_Release(&rows_probe);
    const struct { int writable; Py_ssize_t need; const char *what; } spec[J_COUNT_OF] = {
        [J_RING] = {0, cap * width, "ring"},
        [J_HAVE] = {1, cap * width, "have"},
        [J_STARTED] = {0, cap, "started"},
        [J_TRANSIT] = {0, cap * history * 8, "transit"},
        [J_BASE] = {0, cap * 8, "base"},
        [J_ALIGN] = {0, cap * 8, "align"},
        [J_PACKET] = {0, cap * 8, "packet"},
        [J_FRESH] = {1, cap, "fresh"},
        [J_PLAY] = {1, cap * 8, "play"},
        [J_WHOLE] = {0, cap, "whole"},
        [J_COUNT] = {0, cap * 8, "count"},
        [J_LAST_ARRIVAL] = {0, cap * 8, "last_arrival"},
        [J_FADE] = {1, cap * 4, "fade"},
        [J_CONCEALED] = {1, cap * 8, "concealed"},
        [J_LAST_POS] = {1, cap * 8, "last_pos"},
        [J_DELAY] = {1, cap * 8, "delay"},
        [J_ROWS] = {0, n * 8, "rows"},
        [J_TALKING] = {0, n, "talking"},
        [J_TABLE] = {0, 256 * 4, "table"},
        [J_LAW] = {0, cap * 8, "law"},
        [J_LAST] = {0, 0, "last"},
        [J_OUT] = {1, n * frame * 4, "out"},
    };
    for (; got < J_COUNT_OF && ok; got++) {
        PyObject *obj = got < J_ROWS ? PyTuple_GET_ITEM(columns, got)
                        : got == J_ROWS ? rows_o
                        : got == J_TALKING ? talking_o
                        : got == J_TABLE ? table_o
                        : got == J_LAW ? law_o
                        : got == J_LAST ? last_o
                        : out_o;
        ok = take_buffer(obj, &b[got], spec[got].writable, spec[got].need, spec[got].what);
    }
    if (!ok)
        got--; /* the one that failed holds nothing */
    if (ok) {
        const uint8_t *ring = b[J_RING].buf, *started = b[J_STARTED].buf;
        uint8_t *have = b[J_HAVE].buf, *fresh = b[J_FRESH].buf;
        const uint8_t *whole = b[J_WHOLE].buf, *talking = b[J_TALKING].buf;
        const double *transit = b[J_TRANSIT].buf, *base = b[J_BASE].buf;
        const double *last_arrival = b[J_LAST_ARRIVAL].buf;
        const int64_t *align = b[J_ALIGN].buf, *packet = b[J_PACKET].buf;
        const int64_t *count = b[J_COUNT].buf, *rows = b[J_ROWS].buf, *law = b[J_LAW].buf;
        int64_t *play = b[J_PLAY].buf, *concealed = b[J_CONCEALED].buf;
        int64_t *last_pos = b[J_LAST_POS].buf;
        double *delay = b[J_DELAY].buf;
        float *fade = b[J_FADE].buf, *out = b[J_OUT].buf;
        const float *table = b[J_TABLE].buf, *last = b[J_LAST].buf;
        Py_ssize_t laws = b[J_TABLE].len / (256 * 4);
        Py_ssize_t last_rows = b[J_LAST].len / (frame * 4);
        int64_t mask = ring_size - 1;
        /* where each row's previous frame is, before this tick moves it */
        int64_t *before = malloc((size_t)(n > 0 ? n : 1) * sizeof(int64_t));
        if (before == NULL) {
            PyErr_NoMemory();
            ok = 0;
        }
        for (Py_ssize_t i = 0; ok && i < n; i++) {
            int64_t row = rows[i];
            if (row < 0 || row >= cap || law[row] < 0 || law[row] >= laws) {
                PyErr_SetString(PyExc_ValueError, "playout: a row or law out of range");
                ok = 0;
                break;
            }
            before[i] = last_pos[row];
            live += started[row] != 0;
        }
        if (ok && live == 0) { /* nothing to play: silence, and the last frames stay */
            memset(out, 0, (size_t)(n * frame) * sizeof(float));
            n = 0;
        }
        for (Py_ssize_t i = 0; ok && live && i < cap; i++)
            last_pos[i] = -1;
        for (Py_ssize_t i = 0; ok && i < n; i++) {
            int64_t row = rows[i];
            float *pcm = out + i * frame;
            if (!started[row]) {
                memset(pcm, 0, (size_t)frame * sizeof(float));
                continue;
            }
            /* the fastest transit and the RANK-th slowest of the history */
            const double *h = transit + row * history;
            double fastest = h[0], top[16];
            Py_ssize_t kept = 0, want = rank < 16 ? rank : 16;
            for (Py_ssize_t j = 0; j < history; j++) {
                double v = h[j];
                if (v < fastest)
                    fastest = v;
                Py_ssize_t at = kept < want ? kept++ : want;
                if (at == want && v <= top[want - 1])
                    continue;
                if (at == want)
                    at = want - 1;
                while (at > 0 && top[at - 1] < v) {
                    top[at] = top[at - 1];
                    at--;
                }
                top[at] = v;
            }
            double slowest = top[want - 1];
            double local = now - base[row];
            int64_t ready = (int64_t)floor(local - slowest - (double)margin);
            int64_t p = packet[row] > 0 ? packet[row] : 1;
            int64_t off = (ready - align[row]) % p;
            ready -= off < 0 ? off + p : off;
            int64_t target = ready - frame;
            int64_t at = fresh[row] ? target : play[row];
            int64_t diff = target - at;
            int64_t creep = talking[i] ? creep_talking : frame;
            if (whole[row] && talking[i])
                creep = count[row] % creep_every == 0 ? frame : 0;
            int64_t step = 0;
            if (diff < 0)
                step = diff;
            else if (diff > hysteresis) { /* forget what is skipped: no replay a lap later */
                step = diff < creep ? diff : creep;
                for (int64_t j = 0; j < step; j++) {
                    int64_t q = (at + j) & mask;
                    have[row * width + q] = 0;
                    if (q < tail)
                        have[row * width + q + ring_size] = 0;
                }
            }
            at += step;
            fresh[row] = 0;
            int64_t start = at & mask;
            const uint8_t *codes = ring + row * width + start;
            uint8_t *present = have + row * width + start;
            const float *decode = table + law[row] * 256;
            Py_ssize_t missing = 0;
            for (Py_ssize_t j = 0; j < frame; j++) {
                pcm[j] = decode[codes[j]];
                missing += !present[j];
            }
            float f = fade[row];
            if (missing) {
                int64_t pos = before[i];
                float gain = pos >= 0 ? f : 0.0f;
                const float *previous = pos >= 0 && pos < last_rows ? last + pos * frame : NULL;
                for (Py_ssize_t j = 0; j < frame; j++)
                    if (!present[j])
                        pcm[j] = previous != NULL ? previous[j] * gain : 0.0f;
                fade[row] = missing == frame ? f * (float)plc_fade : f;
                if (now - last_arrival[row] < 10.0 * (double)frame)
                    concealed[row] += missing;
            } else {
                fade[row] = 1.0f;
            }
            for (Py_ssize_t j = 0; j < frame; j++) { /* played: gone from the ring */
                int64_t q = (start + j) & mask;
                have[row * width + q] = 0;
                if (q < tail)
                    have[row * width + q + ring_size] = 0;
            }
            last_pos[row] = i;
            play[row] = at + frame;
            delay[row] = local - (double)frame - (double)at - fastest;
        }
        free(before);
    }
    for (int i = 0; i < got; i++)
        PyBuffer_Release(&b[i]);
    if (!ok)
        return NULL;
    return PyLong_FromSsize_t(live);
}

static PyMethodDef methods[] = {
    {"lookup", py_lookup, METH_VARARGS,
     "lookup(data, width, source, addresses, keys, key_rows, sole, rows, match): each "
     "packet's leg by source address and SSRC"},
    {"ext_news", py_ext_news, METH_VARARGS,
     "ext_news(data, width, length, rows, match, ext_in, heard, heard_len, size, news): "
     "talker blocks to take out, and which are news; returns the count of news"},
    {"classify", py_classify, METH_VARARGS,
     "classify(data, width, length, truncated, rows, match, ext_size, payload_type, "
     "max_packet, max_payload, kind, seq, ts, ssrc, marker, rank): drop classes and header "
     "fields, blocks taken out in place; returns the rounds of FAST packets"},
    {"build", py_build, METH_VARARGS,
     "build(packets, width, payloads, silence, size, rows, payload_type, first, seq, ts, "
     "ssrc, ext_len, ext_block, length): the send batch's packets, headers and extension "
     "blocks in"},
    {"srtp_rows", py_srtp_rows, METH_VARARGS,
     "srtp_rows(calls, pick, data, width, which, contexts, length, status, room): libsrtp "
     "on rows of a packet buffer, in place"},
    {"put", py_put, METH_VARARGS,
     "put(columns, rows, timestamps, codes, arrival, marker, keep, frame, constants): one "
     "packet per row into the jitter bank"},
    {"playout", py_playout, METH_VARARGS,
     "playout(columns, rows, talking, table, law, last, out, now, frame, constants): the "
     "jitter bank's frame for each row, concealment included"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_rtpbatch",
    .m_doc = "The receive batch's per-packet column work in C.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__rtpbatch(void)
{
    return PyModule_Create(&module);
}
