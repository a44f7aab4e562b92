/* The variable-ratio sinc interpolator's inner loop (see interp.py, SincInterpolator).
 *
 * NumPy does this as a gather of (outputs x taps) samples, a gather and a blend of as
 * many kernel weights, and a row-wise dot: about 120 us for one 20 ms frame of a radio
 * at 48 kHz, with each radio running it twice a tick (receive and transmit). The same
 * arithmetic in one C loop, with no temporaries, takes a few microseconds.
 *
 * Output k is at input position pos + k * step (buffer index, fractional): its kernel
 * row is the table's row at the position's fraction (PHASES rows per sample), blended
 * linearly with the next one (slope = next row - this row). */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>

static PyObject *py_interpolate(PyObject *self, PyObject *args)
{
    (void)self;
    Py_buffer buf, table, slope, out;
    double pos, step;
    int phases, taps;
    if (!PyArg_ParseTuple(args, "y*y*y*ddiiw*:interpolate", &buf, &table, &slope, &pos,
                          &step, &phases, &taps, &out))
        return NULL;
    const float *x = buf.buf, *t = table.buf, *s = slope.buf;
    float *y = out.buf;
    Py_ssize_t len = buf.len / (Py_ssize_t)sizeof(float);
    Py_ssize_t n = out.len / (Py_ssize_t)sizeof(float);
    Py_ssize_t rows = (Py_ssize_t)phases * taps * (Py_ssize_t)sizeof(float);
    int half = taps / 2;
    const char *error = NULL;
    if (phases < 1 || taps < 2 || taps % 2 || table.len < rows || slope.len < rows)
        error = "interpolate: the table and slope need phases x taps float32";
    else if (n > 0 && (floor(pos) - (half - 1) < 0 || floor(pos + (double)(n - 1) * step) + half >= len))
        error = "interpolate: an output's kernel reaches outside the buffer";
    for (Py_ssize_t k = 0; error == NULL && k < n; k++) {
        double p = pos + (double)k * step;
        double base = floor(p);
        double phase = (p - base) * phases;
        int row = (int)phase;
        if (row > phases - 1)
            row = phases - 1;
        float alpha = (float)(phase - row);
        const float *w = t + (Py_ssize_t)row * taps, *dw = s + (Py_ssize_t)row * taps;
        const float *in = x + (Py_ssize_t)base - (half - 1);
        /* four running sums: the compiler keeps them in one vector register */
        float sum[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        int j = 0;
        for (; j + 4 <= taps; j += 4)
            for (int l = 0; l < 4; l++)
                sum[l] += in[j + l] * (w[j + l] + alpha * dw[j + l]);
        for (; j < taps; j++)
            sum[0] += in[j] * (w[j] + alpha * dw[j]);
        y[k] = (sum[0] + sum[1]) + (sum[2] + sum[3]);
    }
    PyBuffer_Release(&buf);
    PyBuffer_Release(&table);
    PyBuffer_Release(&slope);
    PyBuffer_Release(&out);
    if (error != NULL) {
        PyErr_SetString(PyExc_ValueError, error);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"interpolate", py_interpolate, METH_VARARGS,
     "interpolate(buf, table, slope, pos, step, phases, taps, out): out[k] is the "
     "windowed-sinc value of buf at pos + k * step"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_sinc",
    .m_doc = "The variable-ratio sinc interpolator's inner loop in C.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__sinc(void) { return PyModule_Create(&module); }
